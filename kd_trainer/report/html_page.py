"""``index.html``: the report as one page a browser opens from disk.

The page holds the results tables (the cells of ``results.md``, cost columns included), the loss
curves, each dataset's retrieval galleries (one column per run, teacher / no KD / KD side by side,
the same sampled captions in every column), and where distillation changed the rank-1 answer,
under a contents list that links to each section. A gallery row holds each run's k images side by
side; a table wider than the window scrolls sideways inside its box, with the caption column fixed.

Self-contained: no script, no stylesheet or font from elsewhere; every image is a file beside the
page (the loss-curve PNGs, and the gallery images copied under ``gallery/<dataset>/``), referenced
by a relative path, so the folder can be moved or zipped as it is.

Machine-readable marks, for tests and scripts: each ranking cell is ``td.ranking`` with
``data-run`` (the run folder) and ``data-query`` (the caption's index in the test split); each
image in it is ``figure.hit`` with ``data-rank``, ``data-gallery-index``, ``data-file`` (the image
path the dataset lists) and the class ``correct`` or ``wrong``; each KD comparison is
``section.kd-changed`` with ``data-kd-run``, ``data-nokd-run`` and the counts in
``span.count[data-direction=kd-only|nokd-only]``.
"""

from __future__ import annotations

import html
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kd_trainer.report.dataset_names import dataset_display_name
from kd_trainer.report.discovery import RunSummary, display_folder
from kd_trainer.report.galleries import KD, NO_KD, ROLE_ORDER, TEACHER, GalleryOptions, KdChange, Ranking, TestSplit
from kd_trainer.report.seeds import run_seed
from kd_trainer.report.tables import TableCells

__all__ = ["RunGallery", "DatasetGalleries", "ChangedAnswers", "write_html", "ROLE_RULE"]

ROLE_RULE = (f"Roles are read from the recipes: <b>{TEACHER}</b> = a run another run here names as its teacher "
             f"checkpoint; <b>{KD}</b> = a run with a loss term that reads a teacher; <b>{NO_KD}</b> = every other "
             "run (none of its terms reads a teacher, even when it inherits a teacher's weights).")

_CSS = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
th, td { border: 1px solid #bbb; padding: 4px 8px; vertical-align: top; }
th { background: #eee; }
table.results td { text-align: center; white-space: nowrap; }
table.results td:first-child { text-align: left; }
p.note { font-size: 0.9em; white-space: pre-line; max-width: 70em; }
td.caption { min-width: 12em; max-width: 18em; font-size: 0.85em; }
div.scroll { overflow-x: auto; max-width: 100%; }
div.scroll td.caption { position: sticky; left: 0; background: #fff; z-index: 1; }
td.ranking { white-space: nowrap; }
nav.toc { font-size: 0.9em; margin: 0 0 1em; }
nav.toc ul { margin: 0.2em 0; padding-left: 1.4em; }
div.curves { display: flex; flex-wrap: wrap; gap: 0 1.5em; }
div.curves > div { flex: 1 1 36em; max-width: 56em; }
div.curves h3 { font-size: 1em; }
figure.hit { display: inline-block; margin: 2px; text-align: center; font-size: 0.75em; }
figure.hit img { display: block; height: 96px; border: 4px solid; }
figure.correct img { border-color: #1a9641; }
figure.wrong img { border-color: #d7191c; border-style: dashed; }
figure.correct figcaption { color: #1a9641; }
figure.wrong figcaption { color: #d7191c; }
img.curve { width: 100%; }
.role { font-weight: normal; font-size: 0.85em; color: #555; }
"""


@dataclass(frozen=True)
class RunGallery:
    run: RunSummary
    role: str
    ranking: Ranking


@dataclass(frozen=True)
class ChangedAnswers:
    kd: RunGallery
    nokd: RunGallery
    change: KdChange
    shown_kd_only: list[int]  # the sampled examples of each direction
    shown_nokd_only: list[int]


@dataclass(frozen=True)
class DatasetGalleries:
    split: TestSplit
    queries: list[int]  # the sampled caption indices
    runs: list[RunGallery]  # in role order
    changed: list[ChangedAnswers] = field(default_factory=list)


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _run_heading(g: RunGallery) -> str:
    seed = run_seed(g.run)
    return (f"{_e(g.run.label)}" + (f", seed {_e(seed)}" if seed is not None else "")
            + f"<br><span class=\"role\">{_e(g.role)} · <code>{_e(display_folder(g.run.folder))}</code></span>")


class _Images:
    """Copies the gallery images a page shows beside it, once each."""

    def __init__(self, out: Path):
        self.out = out
        self.copied: dict[tuple[str, int], str] = {}

    def src(self, split: TestSplit, index: int) -> str:
        key = (split.dataset, index)
        if key not in self.copied:
            source = Path(split.image_paths[index])
            name = re.sub(r"[^A-Za-z0-9._-]+", "_", source.name)
            rel = Path("gallery") / split.dataset / f"{index:06d}_{name}"
            (self.out / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, self.out / rel)
            self.copied[key] = rel.as_posix()
        return self.copied[key]


def _ranking_cell(images: _Images, split: TestSplit, g: RunGallery, q: int) -> str:
    figs = []
    for rank, (idx, ok) in enumerate(zip(g.ranking.top[q].tolist(), g.ranking.correct[q].tolist()), start=1):
        mark = "correct" if ok else "wrong"
        figs.append(f'<figure class="hit {mark}" data-rank="{rank}" data-gallery-index="{idx}" '
                    f'data-file="{_e(split.image_paths[idx])}"><img src="{_e(images.src(split, idx))}" '
                    f'alt="rank {rank}, {mark}"><figcaption>{rank} {"✓" if ok else "✗"}</figcaption></figure>')
    return (f'<td class="ranking" data-run="{_e(display_folder(g.run.folder))}" data-query="{q}">'
            + "".join(figs) + "</td>")


def _gallery_table(images: _Images, split: TestSplit, runs: Sequence[RunGallery], queries: Sequence[int]) -> str:
    head = "<tr><th>Caption (test split index)</th>" + "".join(f"<th>{_run_heading(g)}</th>" for g in runs) + "</tr>"
    rows = []
    for q in queries:
        rows.append(f'<tr class="query" data-query="{q}"><td class="caption">{_e(split.captions[q])} '
                    f"<small>(#{q}, person {int(split.query_pids[q])})</small></td>"
                    + "".join(_ranking_cell(images, split, g, q) for g in runs) + "</tr>")
    # One row of k images per ranking; the table scrolls sideways inside its box, caption column fixed.
    return '<div class="scroll"><table class="gallery">' + head + "".join(rows) + "</table></div>"


def _results_table(task: str, cells: TableCells) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in cells.head)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in cells.body)
    notes = "".join(f'<p class="note">{_e(n)}</p>' for n in cells.notes)
    return f'<table class="results" data-task="{_e(task)}"><tr>{head}</tr>{body}</table>{notes}'


def _changed_section(images: _Images, split: TestSplit, c: ChangedAnswers) -> str:
    kd, nokd = c.kd, c.nokd
    parts = [f'<section class="kd-changed" data-kd-run="{_e(display_folder(kd.run.folder))}" '
             f'data-nokd-run="{_e(display_folder(nokd.run.folder))}">',
             f"<h4>{_e(kd.run.label)} vs {_e(nokd.run.label)}</h4>",
             f'<p>Of {len(split.captions)} test captions, the KD student is right at rank 1 and the student '
             f'without KD wrong on <span class="count" data-direction="kd-only">{len(c.change.kd_only)}</span>; '
             f'the reverse on <span class="count" data-direction="nokd-only">{len(c.change.nokd_only)}</span>.</p>']
    for title, shown, total in (("KD right, no KD wrong", c.shown_kd_only, c.change.kd_only),
                                ("No KD right, KD wrong", c.shown_nokd_only, c.change.nokd_only)):
        if shown:
            parts.append(f"<p>{title}: {len(shown)} of {len(total)} shown (a seeded sample).</p>")
            parts.append(_gallery_table(images, split, [kd, nokd], shown))
    return "".join(parts) + "</section>"


def _contents(toc: Sequence[tuple[int, str, str]]) -> str:
    """The page's contents as nested links: level 0 = a section, level 1 = an entry inside the section before."""
    sections: list[tuple[str, list[str]]] = []
    for level, anchor, title in toc:
        link = f'<a href="#{_e(anchor)}">{_e(title)}</a>'
        if level == 0 or not sections:
            sections.append((link, []))
        else:
            sections[-1][1].append(link)
    items = "".join(f"<li>{link}" + (f"<ul>{''.join(f'<li>{s}</li>' for s in sub)}</ul>" if sub else "") + "</li>"
                    for link, sub in sections)
    return f'<nav class="toc"><b>Contents</b><ul>{items}</ul></nav>'


def write_html(
    out: Path,
    *,
    tables: Mapping[str, TableCells],
    plots: Mapping[str, Path],
    runs: Sequence[RunSummary],
    galleries: Sequence[DatasetGalleries],
    options: GalleryOptions | None,
    notes: Sequence[str] = (),
) -> Path:
    """Write ``out/index.html`` (and the gallery images under ``out/gallery/``); return its path.
    ``notes``: lines about what the page lacks and why (runs without weights or data)."""
    images = _Images(out)
    toc: list[tuple[int, str, str]] = [(0, "results", "Results")]  # (level, anchor, title)
    body = ['<h2 id="results">Results</h2>']
    for task, cells in tables.items():
        if len(tables) > 1:
            body.append(f"<h3>{_e(task.capitalize())}</h3>")
        body.append(_results_table(task, cells))
    if plots:
        toc.append((0, "loss-curves", "Loss curves"))
        body.append('<h2 id="loss-curves">Loss curves</h2><div class="curves">')
        by_folder = {str(r.folder): r for r in runs}
        for folder, path in plots.items():
            r = by_folder.get(folder)
            title = f"{r.label} ({display_folder(r.folder)})" if r is not None else folder
            body.append(f"<div><h3>{_e(title)}</h3><img class=\"curve\" src=\"{_e(path.name)}\" "
                        f"alt=\"loss curves of {_e(title)}\"></div>")
        body.append("</div>")
    if galleries and options is not None:
        toc.append((0, "galleries", "Retrieval galleries"))
        body.append('<h2 id="galleries">Retrieval galleries</h2>')
        body.append(f"<p>For {options.queries} test captions drawn with seed {options.seed} (the same in every "
                    f"column), each run's top {options.k} gallery images, rank 1 first, ranked as "
                    "<code>kd-trainer eval</code> ranks them. A solid green frame (✓) is the caption's person, "
                    f"a dashed red frame (✗) another person. {ROLE_RULE}</p>")
        for g in galleries:
            name = dataset_display_name(g.split.dataset)
            anchor = "gallery-" + re.sub(r"[^A-Za-z0-9_-]+", "-", g.split.dataset)
            toc.append((1, anchor, name))
            body.append(f'<h3 id="{_e(anchor)}">{_e(name)}</h3>')
            body.append(_gallery_table(images, g.split, g.runs, g.queries))
            if g.changed:
                toc.append((1, f"changed-{anchor}", f"Where distillation changed the answer ({name})"))
                body.append(f'<h3 id="changed-{_e(anchor)}">Where distillation changed the answer ({_e(name)})'
                            "</h3><p>Each KD student against the student without KD on this dataset (the one with "
                            "its seed, else the first), over every test caption.</p>")
                body += [_changed_section(images, g.split, c) for c in g.changed]
    if notes:
        toc.append((0, "not-shown", "Not shown"))
        body.append('<h2 id="not-shown">Not shown</h2><ul>' + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>")
    body[:0] = ["<h1>kd_trainer report</h1>", _contents(toc)]
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>kd_trainer report</title>"
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
    path = out / "index.html"
    path.write_text(page, encoding="utf-8")
    return path


def order_by_role(galleries: Sequence[RunGallery]) -> list[RunGallery]:
    """Teacher first, then no KD, then KD; runs of one role in report order."""
    return sorted(galleries, key=lambda g: ROLE_ORDER.index(g.role))
