"""``kd-trainer report``'s page (index.html) and cost columns, on real files: a generated SynthPEDES,
three run folders holding saved ``micro`` models (a teacher, a student without KD, a student with
KD; untrained, so their rankings differ), each with its test results written by ``kd-trainer eval``.

* the galleries are checked against a ranking worked out here (a stable full sort of cosine
  similarities) whose R@1 is the one ``kd-trainer eval`` reports: the same top-k files, the same
  correct / wrong marks, and the KD-changed counts of a direct comparison of rank-1 hits;
* parameters exactly, FLOPs within 1% of a hand count of the model's matmuls;
* the page in headless Chromium: every image decoded, the table there, a screenshot.
"""

from __future__ import annotations

import json
import re
import warnings
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import save_file

from browser import open_page
from kd_trainer.cli import main
from kd_trainer.data import collate_retrieval, load_pedes, with_retrieval_transforms
from kd_trainer.evaluation import embed_dataset
from kd_trainer.models.factory import create_model, get_architecture
from kd_trainer.models.loading import MODEL_CONFIG_NAME, model_config, model_from_checkpoint
from kd_trainer.recipe import dump_recipe, load_recipe
from kd_trainer.report import (
    GalleryOptions,
    Latency,
    SkippedRunWarning,
    collect_runs,
    model_efficiency,
    run_roles,
    write_report,
)
from kd_trainer.report.galleries import KD, NO_KD, TEACHER
from kd_trainer.synthetic.pedes import make_synth_pedes

REPO = Path(__file__).resolve().parents[1]
SLOW = pytest.mark.slow  # the module's runs: a generated dataset, three saved models, eval and report
K = 4
OPTIONS = GalleryOptions(queries=6, k=K, seed=0, changed=3)
ROLES = {"teacher": TEACHER, "nokd": NO_KD, "kd": KD}


# --------------------------------------------------------------------------- run folders on disk
def _save_run(folder: Path, *, name: str, seed: int, data_root: Path, terms: list, teacher: Path | None) -> None:
    torch.manual_seed(seed)
    model = create_model("micro")
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / MODEL_CONFIG_NAME).write_text(json.dumps(model_config(model)))
    recipe = {"name": name, "method": name.capitalize(), "seed": seed,
              "data": {"name": "synth_pedes", "root": str(data_root), "image_size": [32, 16]},
              "student": {"arch": "micro"}, "loss": {"terms": terms},
              "training": {"output_dir": str(folder), "report_to": "none", "use_cpu": True}}
    if teacher is not None:  # the no-KD student loads it too (as for weight inheritance), but no term reads it
        recipe["teacher"] = {"arch": "micro", "checkpoint": str(teacher)}
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """``{"data": root, "teacher" | "nokd" | "kd": run folder}``, test results from ``kd-trainer eval``."""
    base = tmp_path_factory.mktemp("report_html")
    data = base / "data"
    make_synth_pedes(data / "SynthPEDES", num_identities=40, images_per_identity=(2, 3), image_size=(32, 16),
                     split_identities=(0.2, 0.1, 0.7), seed=3)
    teacher = base / "runs" / "teacher"
    _save_run(teacher, name="teacher", seed=1, data_root=data, terms=[{"name": "itc"}], teacher=None)
    _save_run(base / "runs" / "nokd", name="nokd", seed=2, data_root=data, terms=[{"name": "itc"}], teacher=teacher)
    _save_run(base / "runs" / "kd", name="kd", seed=3, data_root=data, terms=[{"name": "itc"}, {"name": "icl"}],
              teacher=teacher)
    out = {"data": data}
    for role in ROLES:
        folder = base / "runs" / role
        main(["eval", str(folder), "--dataset", "synth_pedes", "--root", str(data), "--output",
              str(folder / "eval.json")])
        metrics = json.loads((folder / "eval.json").read_text())
        (folder / "test_results.json").write_text(json.dumps({f"test_{k}": v for k, v in metrics.items()}))
        out[role] = folder
    return out


@pytest.fixture(scope="module")
def report(runs: dict[str, Path], tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("report_out")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedRunWarning)  # the runs have no trainer_state.json: no plots
        written = write_report([runs["teacher"].parent], out, latency=Latency(warmup=0, iters=2), galleries=OPTIONS)
    return {**written, "out": out, "page": _parse(written["html"])}


# --------------------------------------------------------------------------- what the page shows
class _Page(HTMLParser):
    """The page's ranking cells, KD comparisons and results tables, read from its markup."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: list[dict] = []  # {run, query, hits: [{rank, index, file, mark, src}]}
        self.changed: list[dict] = []  # {kd, nokd, counts: {direction: int}}
        self.tables: list[list[list[str]]] = []
        self._hit: dict | None = None
        self._count: str | None = None
        self._row: list[str] | None = None
        self._text: list[str] | None = None
        self._in_results = False

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        cls = (a.get("class") or "").split()
        if tag == "td" and "ranking" in cls:
            self.cells.append({"run": a["data-run"], "query": int(a["data-query"]), "hits": []})
        elif tag == "figure" and "hit" in cls:
            self._hit = {"rank": int(a["data-rank"]), "index": int(a["data-gallery-index"]), "file": a["data-file"],
                         "mark": "correct" if "correct" in cls else "wrong" if "wrong" in cls else "?"}
            self.cells[-1]["hits"].append(self._hit)
        elif tag == "img" and self._hit is not None:
            self._hit["src"] = a["src"]
        elif tag == "section" and "kd-changed" in cls:
            self.changed.append({"kd": a["data-kd-run"], "nokd": a["data-nokd-run"], "counts": {}})
        elif tag == "span" and "count" in cls:
            self._count, self._text = a["data-direction"], []
        elif tag == "table" and "results" in cls:
            self._in_results = True
            self.tables.append([])
        elif tag == "tr" and self._in_results:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._text = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "figure":
            self._hit = None
        elif tag == "span" and self._count is not None:
            self.changed[-1]["counts"][self._count] = int("".join(self._text or []))
            self._count, self._text = None, None
        elif tag in ("td", "th") and self._row is not None and self._text is not None:
            self._row.append("".join(self._text).strip())
            self._text = None
        elif tag == "tr" and self._row is not None:
            self.tables[-1].append(self._row)
            self._row = None
        elif tag == "table":
            self._in_results = False

    def handle_data(self, data: str) -> None:
        if self._text is not None:
            self._text.append(data)


def _parse(page: Path) -> _Page:
    parser = _Page()
    parser.feed(page.read_text(encoding="utf-8"))
    return parser


def _folder_of(page_run: str, runs: dict[str, Path]) -> str:
    """The role of the run a page cell names (``data-run`` is the folder, relative to the cwd when under it)."""
    for role in ROLES:
        if Path(page_run).resolve() == runs[role].resolve():
            return role
    raise AssertionError(f"the page names a run folder the report was not given: {page_run}")


# --------------------------------------------------------------------------- the reference ranking
def _reference(folder: Path, data_root: Path) -> tuple[torch.Tensor, torch.Tensor, list[str], torch.Tensor]:
    """(order (Q, G), correct (Q, G), gallery files, query pids): a stable descending sort of the cosine
    similarities of the model's embeddings, ties by gallery order."""
    model = model_from_checkpoint(folder).eval()
    raw = load_pedes("synth_pedes", data_root, splits=["test"])
    views = with_retrieval_transforms(raw, image_size=model.image_size, augment=False,
                                      context_length=model.context_length)
    g, gp = embed_dataset(model.encode_image, views["test_gallery"], "pixel_values", device=torch.device("cpu"),
                          collate_fn=collate_retrieval, progress=False)
    q, qp = embed_dataset(model.encode_text, views["test_queries"], "input_ids", device=torch.device("cpu"),
                          collate_fn=collate_retrieval, progress=False)
    sims = F.normalize(q, dim=1) @ F.normalize(g, dim=1).T
    order = torch.sort(sims, dim=1, descending=True, stable=True).indices
    return order, gp[order] == qp[:, None], list(raw["test_gallery"]["image_path"]), qp


@pytest.fixture(scope="module")
def reference(runs: dict[str, Path]) -> dict[str, tuple]:
    return {role: _reference(runs[role], runs["data"]) for role in ROLES}


@SLOW
def test_reference_rank1_is_what_kd_trainer_eval_reports(runs: dict[str, Path], reference: dict) -> None:
    for role in ROLES:
        _, correct, _, _ = reference[role]
        r1 = json.loads((runs[role] / "eval.json").read_text())["r1"]
        assert 100.0 * int(correct[:, 0].sum()) / correct.shape[0] == pytest.approx(r1, abs=1e-9), role


@SLOW
def test_galleries_show_the_eval_ranking(report: dict, runs: dict[str, Path], reference: dict) -> None:
    page = report["page"]
    by_run: dict[str, list[dict]] = {}
    for c in page.cells:
        by_run.setdefault(_folder_of(c["run"], runs), []).append(c)
    assert set(by_run) == set(ROLES), "one gallery column per run with weights"
    assert len(by_run["teacher"]) == OPTIONS.queries, "the teacher shows the sampled captions only"
    for role, cells in by_run.items():
        order, correct, files, _ = reference[role]
        for c in cells:
            q = c["query"]
            assert [h["rank"] for h in c["hits"]] == list(range(1, K + 1))
            assert [h["index"] for h in c["hits"]] == order[q, :K].tolist(), (role, q)
            assert [h["file"] for h in c["hits"]] == [files[i] for i in order[q, :K].tolist()]
            assert [h["mark"] for h in c["hits"]] == ["correct" if ok else "wrong" for ok in correct[q, :K].tolist()]
            for h in c["hits"]:  # the image beside the page is the dataset's file
                assert (report["out"] / h["src"]).read_bytes() == Path(h["file"]).read_bytes()


@SLOW
def test_the_contents_list_links_to_every_section_once(report: dict) -> None:
    html = report["html"].read_text(encoding="utf-8")
    nav = re.search(r'<nav class="toc">(.*?)</nav>', html, re.S).group(1)
    links = re.findall(r'href="#([^"]+)"', nav)
    ids = re.findall(r'<h[1-4] id="([^"]+)"', html)
    assert links == ids, "each section heading listed once, in page order"
    assert links[0] == "results" and "galleries" in links and "loss-curves" not in links  # plots=False here
    assert any(a.startswith("gallery-") for a in links) and any(a.startswith("changed-") for a in links)


@SLOW
def test_the_same_sampled_captions_side_by_side_in_role_order(report: dict, runs: dict[str, Path]) -> None:
    html = report["html"].read_text(encoding="utf-8")
    gallery = html[html.index('<h2 id="galleries">'):html.index('<h3 id="changed-')]  # past the contents list
    first = _parse_fragment(gallery)
    assert [_folder_of(c["run"], runs) for c in first.cells[:3]] == ["teacher", "nokd", "kd"]
    per_role = {}
    for c in first.cells:
        per_role.setdefault(_folder_of(c["run"], runs), []).append(c["query"])
    assert len({tuple(v) for v in per_role.values()}) == 1, "every column shows the same captions"
    assert len(per_role["teacher"]) == OPTIONS.queries
    for role, label in ((TEACHER, "teacher"), (NO_KD, "no KD"), (KD, "KD")):
        assert f'<span class="role">{label} ·' in gallery, role


def _parse_fragment(text: str) -> _Page:
    parser = _Page()
    parser.feed(text)
    return parser


@SLOW
def test_kd_changed_counts_are_a_direct_comparison_of_rank1_hits(report: dict, runs: dict[str, Path],
                                                                  reference: dict) -> None:
    (changed,) = report["page"].changed
    assert _folder_of(changed["kd"], runs) == "kd" and _folder_of(changed["nokd"], runs) == "nokd"
    kd_hit, nokd_hit = reference["kd"][1][:, 0], reference["nokd"][1][:, 0]
    expected = {"kd-only": int((kd_hit & ~nokd_hit).sum()), "nokd-only": int((~kd_hit & nokd_hit).sum())}
    assert changed["counts"] == expected
    assert sum(expected.values()) > 0, "the fixture's two students must disagree somewhere for this to test anything"


@SLOW
def test_the_html_table_holds_the_markdown_cells_and_the_cost_columns(report: dict) -> None:
    (table,) = report["page"].tables
    head, *body = table
    md = report["results"].read_text(encoding="utf-8")
    md_rows = [[c.strip() for c in line.strip("|").split(" | ")] for line in md.splitlines()
               if line.startswith("| ") and "---" not in line]
    assert [[c.strip() for c in r] for r in md_rows] == [head, *body]
    assert head[-3:] == ["Params M (image / text)", "GFLOPs (image / caption)", "CPU ms b1 (image / caption)"]
    for row in body:
        assert row[-3] == "0.02 / 1.60"
        assert row[-2] == "0.000332 / 0.00265"
        image_ms, text_ms = (float(x) for x in row[-1].split(" / "))
        assert image_ms > 0 and text_ms > 0
    assert "torch threads" in md and "FlopCounterMode" in md


# --------------------------------------------------------------------------- cost, by hand
def _hand_count(arch: str, image_size: tuple[int, int], context: int) -> tuple[dict, dict]:
    """Parameters and FLOPs (2 per multiply-add of every matmul and the patch convolution) of an
    open_clip ViT dual encoder, from its architecture numbers alone."""
    a = get_architecture(arch)
    v, t, e = a["vision_cfg"], a["text_cfg"], a["embed_dim"]

    def block(w: int) -> int:  # ln_1, qkv, out, ln_2, fc, proj (MLP ratio 4)
        return 2 * w + (3 * w * w + 3 * w) + (w * w + w) + 2 * w + (4 * w * w + 4 * w) + (4 * w * w + w)

    def block_macs(tokens: int, w: int) -> int:  # qkv, q k^T, attn v, out, fc, proj
        return tokens * w * 3 * w + 2 * tokens * tokens * w + tokens * w * w + 2 * tokens * w * 4 * w

    w, p = v["width"], v["patch_size"]
    patches = (image_size[0] // p) * (image_size[1] // p)
    params_image = 3 * p * p * w + w + (patches + 1) * w + 2 * w + v["layers"] * block(w) + 2 * w + w * e
    macs_image = patches * 3 * p * p * w + v["layers"] * block_macs(patches + 1, w) + w * e
    wt = t["width"]
    params_text = t["vocab_size"] * wt + context * wt + t["layers"] * block(wt) + 2 * wt + wt * e
    macs_text = t["layers"] * block_macs(context, wt) + wt * e
    return {"image": params_image, "text": params_text}, {"image": 2 * macs_image, "text": 2 * macs_text}


@pytest.mark.parametrize("arch,size,context", [("micro", (32, 16), 77), ("micro", (64, 32), 40)])
def test_parameters_exactly_and_flops_within_one_percent_of_a_hand_count(arch: str, size: tuple, context: int
                                                                         ) -> None:
    eff = model_efficiency(create_model(arch, image_size=size, context_length=context))
    params, flops = _hand_count(arch, size, context)
    assert eff.params == params
    for tower in ("image", "text"):
        assert eff.flops[tower] == pytest.approx(flops[tower], rel=0.01), tower
    assert eff.latency_ms is None, "latency is measured only when asked"


# --------------------------------------------------------------------------- CLI and a browser
@SLOW
def test_cli_writes_the_page_and_refuses_bad_gallery_options(runs: dict[str, Path], tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["report", str(runs["kd"]), "--out", str(tmp_path / "bad"), "--no-plots", "--gallery-queries", "0"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: gallery queries must be at least 1, got 0" and "Traceback" not in "".join(err)
    main(["report", str(runs["kd"]), "--out", str(tmp_path / "ok"), "--no-plots", "--latency-iters", "0",
          "--gallery-queries", "2", "--top-k", "3"])
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'ok' / 'index.html'}" in out
    page = _parse(tmp_path / "ok" / "index.html")
    assert len(page.cells) == 2 and all(len(c["hits"]) == 3 for c in page.cells)
    assert "CPU ms" not in page.tables[0][0][-1], "--latency-iters 0: no latency column"


@SLOW
def test_a_dataset_that_does_not_load_leaves_the_gallery_out_and_says_why(runs: dict[str, Path], tmp_path: Path
                                                                          ) -> None:
    with pytest.warns(SkippedRunWarning, match="no synth_pedes gallery"):
        written = write_report([runs["kd"]], tmp_path, plots=False, latency=None,
                               galleries=GalleryOptions(data_root=str(tmp_path / "nowhere")))
    page = written["html"].read_text(encoding="utf-8")
    assert "Not shown" in page and "--data-root" in page
    assert not _parse(written["html"]).cells
    assert "0.02 / 1.60" in written["table"], "the cost columns do not need the data"


@SLOW
def test_the_page_in_headless_chromium(report: dict, tmp_path: Path) -> None:
    shot = tmp_path / "index.png"
    page = open_page(report["html"], screenshot=shot)
    assert page.count("table") >= 2 and page.count("figure") == sum(len(c["hits"]) for c in report["page"].cells)
    assert len(page.images) == page.count("figure"), "every gallery image is an <img> the page loaded"
    assert not page.broken, f"images the browser could not load: {page.broken[:3]}"
    assert all(not i.src.startswith(("http:", "https:", "//")) for i in page.images), "nothing from the network"
    assert shot.stat().st_size > 10_000


def test_roles_come_from_the_recipes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Teacher: named as a checkpoint by another run (a relative path, launched elsewhere, matches the
    folder's tail); KD: a term reads a teacher; no KD: none does, even with a teacher loaded to inherit from."""
    def run(name: str, terms: list, teacher: str | None = None) -> Path:
        folder = tmp_path / "exp" / "runs" / name
        folder.mkdir(parents=True)
        recipe = {"name": name, "seed": 0, "data": {"name": "synth_pedes"}, "student": {"arch": "micro"},
                  "loss": {"terms": terms}, "training": {"output_dir": str(folder)}}
        if teacher:
            recipe["teacher"] = {"arch": "micro", "checkpoint": teacher}
        (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
        (folder / "test_results.json").write_text(json.dumps({"test_r1": 1.0, "test_r5": 2.0, "test_r10": 3.0,
                                                              "test_mAP": 1.0, "test_mINP": 1.0}))
        return folder

    run("t", [{"name": "itc"}])
    run("plain", [{"name": "itc"}], teacher="runs/t")
    run("kd", [{"name": "itc"}, {"name": "crd"}], teacher="runs/t")
    monkeypatch.chdir(tmp_path)  # not where the runs were launched (tmp_path/exp)
    runs = collect_runs([tmp_path / "exp" / "runs"])
    assert {r.name: role for r in runs for f, role in run_roles(runs).items() if f == r.folder} == {
        "t": TEACHER, "plain": NO_KD, "kd": KD}


# --------------------------------------------------------------------------- detection and classification runs
IMAGE_TASK_RUNS = {  # run folder -> (the recipe it was trained with, its test_results.json)
    "cls_kd": ("recipes/cls_res50_to_res18_kd.yaml", {"test_accuracy": 61.5, "epoch": 8.0}),
    "det_mimic": ("recipes/det_frcnn_r50_to_r18_fpn_mimic.yaml",
                  {"test_AP": 20.5, "test_AP50": 41.0, "test_AP75": 18.25, "epoch": 4.0}),
}


def _image_task_runs(root: Path) -> list[Path]:
    """A classification and a detection run folder as their runners leave them, weights aside: the
    recipe saved fully resolved (read back as a ClassificationRecipe / DetectionRecipe, which have
    no retrieval loss terms), and test results."""
    folders = []
    for name, (recipe, results) in IMAGE_TASK_RUNS.items():
        folder = root / name
        folder.mkdir(parents=True)
        (folder / "recipe.yaml").write_text(dump_recipe(load_recipe(REPO / recipe)))
        (folder / "test_results.json").write_text(json.dumps(results))
        folders.append(folder)
    return folders


def test_classification_and_detection_runs_have_no_gallery_and_no_role(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    cls, det = _image_task_runs(tmp_path / "runs")
    assert run_roles(collect_runs([cls, det])) == {}
    out = tmp_path / "rep"
    main(["report", str(cls), str(det), "--out", str(out), "--no-plots", "--latency-iters", "0"])  # galleries on
    captured = capsys.readouterr()
    assert f"wrote {out / 'index.html'}" in captured.out
    assert "galler" not in captured.err, "no retrieval run: nothing to say about galleries"
    html = (out / "index.html").read_text(encoding="utf-8")
    assert 'id="galleries"' not in html and not _parse(out / "index.html").cells
    assert 'data-task="classification"' in html and 'data-task="detection"' in html


@SLOW
def test_a_mixed_report_shows_the_retrieval_runs_galleries(runs: dict[str, Path], tmp_path: Path) -> None:
    cls, det = _image_task_runs(tmp_path / "runs")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedRunWarning)  # no trainer_state.json, no weights for cls/det
        written = write_report([runs["teacher"].parent, cls, det], tmp_path / "rep", plots=False, cost=False,
                               galleries=GalleryOptions(queries=2, k=2, seed=0, changed=0))
    page = _parse(written["html"])
    assert sorted({_folder_of(c["run"], runs) for c in page.cells}) == ["kd", "nokd", "teacher"]
    assert len(page.cells) == 3 * 2 and all(len(c["hits"]) == 2 for c in page.cells)
    assert [(Path(c["kd"]).name, Path(c["nokd"]).name) for c in page.changed] == [("kd", "nokd")]
    assert set(written["tables"]) == {"retrieval", "detection", "classification"}
