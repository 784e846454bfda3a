"""CUHK-PEDES, ICFG-PEDES, RSTPReid and SynthPEDES annotation files -> ``datasets.DatasetDict``.

The layouts are those the IRRA family of codebases reads (``docs/data-formats.md``):
``<root>/<folder>/<annotation>.json`` is a list of records, one per image, and the images
live under ``<root>/<folder>/imgs/``. Each record has an image path, an ``id``, a list of
``captions`` and a ``split``.

``load_pedes`` returns these splits (ICFG-PEDES has no val, so no ``val_*`` splits; the
trainer evaluates on test instead, as IRRA does):

- ``train``: one row per (image, caption): ``image_path`` (absolute), ``caption``,
  ``pid`` (train ids remapped to 0..N-1 by rank of the original id, so CUHK-PEDES gets
  ``id - 1``), ``image_id`` (0..M-1 over train images, in file order).
- ``val_gallery`` / ``test_gallery``: one row per image: ``image_path``, ``pid`` (the
  original id), ``image_id`` (0..M-1 within the split).
- ``val_queries`` / ``test_queries``: one row per caption: ``caption``, ``pid``,
  ``image_id`` (the gallery row it describes).

Bad data is never skipped silently, and everything that can be checked is checked at load
time, before anything trains. A problem in the files raises :class:`DatasetFormatError`
naming the dataset, the file and the record, and saying what was expected:

- images: every listed image must exist; val/test images are also decoded at load, and
  train images too with ``verify_images`` or ``skip_unreadable`` (which drops the
  unreadable ones, with a warning that counts them by kind: missing, empty, not an image,
  truncated, unsupported, corrupt);
- an empty caption list: warned about with counts (kept as IRRA keeps it);
- a caption that cannot be encoded (a lone surrogate from a bad ``\\udXXX`` escape): an error
  naming the record, or dropped and counted with ``skip_unreadable``; an empty or whitespace-only
  caption: warned about, naming the records (kept);
- decoded images smaller than ``TINY_SIDE`` pixels on a side (placeholders): warned about (kept);
- an image listed in train and in val/test (leakage, when both are loaded): warned about, naming
  the records; found by path, and with ``verify_images``/``skip_unreadable`` also by file
  contents (a copy under another name);
- a repeated (image, caption) pair: warned about, refused or dropped (``duplicates``);
- a split left with nothing to train or evaluate on: an error naming the split and why.

What was found is on the result as ``dsd.load_report`` (:class:`LoadReport`) and in each
split's ``info.description``. Errors name the recipe keys (``data.skip_unreadable``,
``data.verify_images``, ``data.duplicates``) that change the behaviour.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable

import datasets

from kd_trainer.data.digest import file_digest
from kd_trainer.data.errors import DatasetFormatError, unwrap_worker_error
from kd_trainer.data.images import TINY_SIDE, UNREADABLE_KINDS, open_image, scan_images

__all__ = [
    "DATASETS",
    "DUPLICATE_POLICIES",
    "DatasetFormat",
    "DatasetFormatError",
    "LoadReport",
    "SPLITS",
    "canonical_dataset_name",
    "last_skipped",
    "load_pedes",
    "open_image",
    "squash_dataset_name",
    "summarize",
    "unwrap_worker_error",
]

logger = logging.getLogger("kd_trainer")

_MAX_LISTED = 10  # problems listed one by one in an error message; the rest are counted

SPLITS = ("train", "val", "test")
DUPLICATE_POLICIES = ("warn", "error", "drop")


@dataclass(frozen=True)
class DatasetFormat:
    """Where one dataset keeps its files and what its annotation records look like."""

    key: str  # the canonical name used in recipes: "cuhk_pedes"
    display_name: str  # the published name: "CUHK-PEDES"
    folder: str  # under root
    annotation_files: tuple[str, ...]  # looked for in this order inside `folder`
    image_key: str  # record key holding the image path relative to imgs/
    splits: tuple[str, ...]  # split values a record may have
    id_base: int  # first id in the file (documentation; pids are remapped by rank anyway)
    captions_per_image: int  # typical count (documentation; not enforced)
    image_dir: str = "imgs"

    @property
    def required_keys(self) -> tuple[str, ...]:
        return (self.image_key, "id", "captions", "split")

    def layout(self) -> str:
        """The expected layout in one line, for error messages."""
        ann = " or ".join(self.annotation_files)
        return (f"<root>/{self.folder}/{ann} (a JSON list of records with keys {list(self.required_keys)}) "
                f"and images under <root>/{self.folder}/{self.image_dir}/")


DATASETS: dict[str, DatasetFormat] = {
    f.key: f
    for f in (
        DatasetFormat("cuhk_pedes", "CUHK-PEDES", "CUHK-PEDES", ("reid_raw.json",), "file_path",
                      ("train", "val", "test"), id_base=1, captions_per_image=2),
        DatasetFormat("icfg_pedes", "ICFG-PEDES", "ICFG-PEDES", ("ICFG-PEDES.json", "ICFG_PEDES.json"),
                      "file_path", ("train", "test"), id_base=1, captions_per_image=1),
        DatasetFormat("rstpreid", "RSTPReid", "RSTPReid", ("data_captions.json",), "img_path",
                      ("train", "val", "test"), id_base=0, captions_per_image=2),
        # Synthetic stand-in written by kd_trainer.synthetic.pedes in the CUHK-PEDES layout.
        DatasetFormat("synth_pedes", "SynthPEDES", "SynthPEDES", ("reid_raw.json",), "file_path",
                      ("train", "val", "test"), id_base=1, captions_per_image=2),
    )
}


def squash_dataset_name(name: str) -> str:
    """A data set name as the loaders compare it: lower case, letters and digits only ("CUHK-PEDES" -> "cuhkpedes")."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


_BY_SQUASHED = {squash_dataset_name(k): k for k in DATASETS} | {
    squash_dataset_name(f.display_name): k for k, f in DATASETS.items()}


def canonical_dataset_name(name: str) -> str:
    """``"CUHK-PEDES"``, ``"cuhk-pedes"``, ``"cuhk_pedes"`` ... -> ``"cuhk_pedes"`` (case, ``-``, ``_`` ignored)."""
    key = _BY_SQUASHED.get(squash_dataset_name(str(name)))
    if key is None:
        valid = ", ".join(f"{k} ({f.display_name})" for k, f in DATASETS.items())
        raise ValueError(f"Unknown dataset {name!r}; valid names: {valid}")
    return key


# ----------------------------------------------------------------------------- images

def _scan_files(top: str) -> set[str]:
    """Every file under ``top`` as a normalised relative path: one walk instead of a stat per record."""
    found: set[str] = set()
    for dirpath, _dirs, files in os.walk(top, followlinks=True):
        rel = os.path.relpath(dirpath, top)
        for f in files:
            found.add(os.path.normpath(os.path.join(rel, f)))
    return found


# ----------------------------------------------------------------------------- records

@dataclass
class _Record:
    index: int  # position in the annotation file
    rel_path: str
    path: str  # absolute
    id: int
    captions: list[str]
    split: str


def _find_dataset_files(spec: DatasetFormat, root: Path) -> tuple[Path, Path, Path]:
    folder = root / spec.folder
    if not folder.is_dir():
        here = sorted(p.name for p in root.iterdir()) if root.is_dir() else None
        seen = (f"; {root} contains {here}" if here is not None else
                f"; {root} is a file, not a folder" if root.exists() else f"; {root} does not exist either")
        raise DatasetFormatError(
            f"{spec.display_name}: dataset folder {folder} not found{seen}. "
            f"Expected {spec.layout()}, with <root> = {root}"
        )
    ann = next((folder / n for n in spec.annotation_files if (folder / n).is_file()), None)
    if ann is None:
        raise DatasetFormatError(
            f"{spec.display_name}: no annotation file in {folder}; looked for {list(spec.annotation_files)}, "
            f"found {sorted(p.name for p in folder.iterdir())}. Expected {spec.layout()}"
        )
    imgs = folder / spec.image_dir
    if not imgs.is_dir():
        raise DatasetFormatError(
            f"{spec.display_name}: image folder {imgs} not found (annotation file {ann.name} is there). "
            f"Expected {spec.layout()}"
        )
    return folder, ann, imgs


def _read_records(spec: DatasetFormat, ann: Path, imgs: Path) -> list[_Record]:
    name = spec.display_name
    try:
        with open(ann, encoding="utf-8-sig") as fh:  # a byte-order mark (Windows editors) is still UTF-8
            raw = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetFormatError(f"{name}: annotation file {ann} is not valid JSON ({e}); expected {spec.layout()}") from e
    if not isinstance(raw, list):
        raise DatasetFormatError(
            f"{name}: annotation file {ann} holds a JSON {type(raw).__name__}, expected a list of records "
            f"(one per image) with keys {list(spec.required_keys)}"
        )

    def bad(i: int, what: str) -> DatasetFormatError:
        return DatasetFormatError(f"{name}: record {i} of {ann}: {what}")

    records: list[_Record] = []
    for i, rec in enumerate(raw):
        if not isinstance(rec, dict):
            raise bad(i, f"is a {type(rec).__name__}, expected an object with keys {list(spec.required_keys)}")
        for key in spec.required_keys:
            if key not in rec:
                raise bad(i, f"missing key {key!r}; every {name} record needs the keys {list(spec.required_keys)} "
                             f"(this one has {sorted(rec)})")
        rel, pid, caps, split = rec[spec.image_key], rec["id"], rec["captions"], rec["split"]
        if not isinstance(rel, str) or not rel:
            raise bad(i, f"{spec.image_key!r} is {rel!r}, expected a non-empty image path relative to {imgs}")
        if isinstance(pid, bool) or not isinstance(pid, int):
            raise bad(i, f"'id' is {pid!r} ({type(pid).__name__}), expected an int (the person id)")
        if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
            raise bad(i, f"'captions' is {caps!r:.120}, expected a list of strings")
        if split not in spec.splits:
            extra = " (ICFG-PEDES has no val split)" if spec.key == "icfg_pedes" and split == "val" else ""
            raise bad(i, f"unknown split {split!r}; {name} records use {list(spec.splits)}{extra}")
        rel_norm = os.path.normpath(rel)
        records.append(_Record(i, rel_norm, os.path.abspath(os.path.join(imgs, rel_norm)), pid, caps, split))
    return records


# ----------------------------------------------------------------------------- checks
#
# Each check takes the records still kept and returns those it keeps; what it finds goes into
# the LoadReport and, unless it is an error, into one warning on the ``kd_trainer`` logger.

def _where(spec: DatasetFormat, r: _Record) -> str:
    return f"record {r.index} ({spec.image_key}={r.rel_path!r}, split {r.split})"


def _kind_counts(kinds: Iterable[str]) -> str:
    counts = Counter(kinds)
    return ", ".join(f"{counts[k]} {k}" for k in UNREADABLE_KINDS if counts[k])


def _check_images(spec: DatasetFormat, ann: Path, imgs: Path, records: list[_Record], *, skip: bool,
                  decode: Callable[[_Record], bool]) -> tuple[list[_Record], dict[str, str], dict[str, int]]:
    """The records whose image is readable; ``{path: kind}`` of the others when ``skip``, else one error;
    and ``{split: count}`` of the decoded images with a side below ``TINY_SIDE`` pixels (warned about, kept).

    Every image is checked for existence (one walk of ``imgs/``); those for which ``decode``
    is true are also decoded, in parallel, with the function training reads them with.
    """
    on_disk = _scan_files(str(imgs))
    # The walk misses nothing a stat would find except odd cases (case-insensitive file systems,
    # paths leaving imgs/ through ".."), so only the misses are checked again one by one.
    problems: dict[int, tuple[str, str]] = {
        r.index: ("missing", "no such file")
        for r in records if r.rel_path not in on_disk and not os.path.isfile(r.path)}
    todo = [r for r in records if r.index not in problems and decode(r)]
    tiny: dict[str, int] = {}
    if todo:
        started = time.perf_counter()
        scan = scan_images([r.path for r in todo])
        for pos, problem in scan.unreadable.items():
            problems[todo[pos].index] = problem
        logger.info("%s (%s): decoded %d images at load in %.1f s (%d unreadable)", spec.display_name,
                    Path(imgs).parent, len(todo), time.perf_counter() - started,
                    sum(r.index in problems for r in todo))
        tiny = _warn_tiny(spec, ann, [(todo[pos], size) for pos, size in sorted(scan.tiny.items())])
    if not problems:
        return records, {}, tiny
    bad = [r for r in records if r.index in problems]
    kinds = _kind_counts(problems[r.index][0] for r in bad)
    if not skip:
        lines = [f"{spec.display_name}: {len(bad)} of {len(records)} images listed in {ann} cannot be read "
                 f"({kinds}):"]
        for r in bad[:_MAX_LISTED]:
            kind, detail = problems[r.index]
            lines.append(f"  {_where(spec, r)}: {kind}: {r.path}" + ("" if kind == "missing" else f" ({detail})"))
        if len(bad) > _MAX_LISTED:
            lines.append(f"  ... and {len(bad) - _MAX_LISTED} more")
        if any(problems[r.index][0] == "unsupported" for r in bad):
            lines.append("An unsupported image decodes, but its pixels have no one right reading as RGB "
                         "(kd_trainer/data/modes.py says how each image mode is read).")
        lines.append(f"Expected every record's {spec.image_key!r} to name a readable image under {imgs}. "
                     f"Set data.skip_unreadable: true in the recipe to drop these images (counted and reported).")
        raise DatasetFormatError("\n".join(lines))
    shown = ", ".join(f"{r.path} ({problems[r.index][0]})" for r in bad[:5])
    more = f", ... ({len(bad) - 5} more)" if len(bad) > 5 else ""
    logger.warning("%s: skipped %d of %d images listed in %s (data.skip_unreadable: true): %s. First: %s%s",
                   spec.display_name, len(bad), len(records), ann, kinds, shown, more)
    return [r for r in records if r.index not in problems], {r.path: problems[r.index][0] for r in bad}, tiny


def _warn_tiny(spec: DatasetFormat, ann: Path, found: list[tuple[_Record, tuple[int, int]]]) -> dict[str, int]:
    """Warn about decoded images with a side below ``TINY_SIDE`` pixels (kept: they are valid files,
    but resized to the model's input they are a flat colour, most likely placeholders); ``{split: count}``."""
    if not found:
        return {}
    counts = Counter(r.split for r, _ in found)
    sizes = "; ".join(f"{_where(spec, r)}: {w}x{h}" for r, (w, h) in found[:5])
    more = f"; ... ({len(found) - 5} more)" if len(found) > 5 else ""
    logger.warning("%s: %d images listed in %s are smaller than %d pixels on a side (%s), most likely placeholders: "
                   "resized to the model's input they are one flat colour. Kept; remove their records to leave "
                   "them out. First: %s%s", spec.display_name, len(found), ann, TINY_SIDE,
                   ", ".join(f"{counts[s]} in {s}" for s in SPLITS if counts[s]), sizes, more)
    return {s: counts[s] for s in SPLITS if counts[s]}


def _check_captions(spec: DatasetFormat, ann: Path, records: list[_Record]) -> dict[str, int]:
    """Warn about records with an empty caption list; ``{split: count}``.

    They are kept as IRRA keeps them, so results stay comparable with published numbers:
    in train such a record yields no sample (its image is never trained on), in val/test
    its image stays in the gallery, a distractor that no query describes.
    """
    empty = [r for r in records if not r.captions]
    if not empty:
        return {}
    counts = Counter(r.split for r in empty)
    effect = []
    if counts["train"]:
        effect.append(f"{counts['train']} in train (their images are left out of training: no caption to pair "
                      f"them with)")
    for s in ("val", "test"):
        if counts[s]:
            effect.append(f"{counts[s]} in {s} (kept in the gallery as images no query describes, as IRRA does)")
    shown = "; ".join(_where(spec, r) for r in empty[:5]) + (f"; ... ({len(empty) - 5} more)" if len(empty) > 5 else "")
    logger.warning("%s: %d records in %s have an empty caption list: %s. First: %s",
                   spec.display_name, len(empty), ann, ", ".join(effect), shown)
    return {s: counts[s] for s in SPLITS if counts[s]}


def _unencodable(caption: str) -> str | None:
    """Why ``caption`` cannot be written as UTF-8 (a lone surrogate, from a bad ``\\udXXX`` escape in the
    JSON), or None. Such text fails when the split is built and would tokenise to bytes of nothing."""
    try:
        caption.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"{e.reason} ({caption[e.start]!r} at character {e.start})"
    return None


def _check_caption_text(spec: DatasetFormat, ann: Path, records: list[_Record], *,
                        skip: bool) -> tuple[list[_Record], dict[str, int], dict[str, int]]:
    """Captions that cannot be encoded (refused naming the record, or dropped and counted with ``skip``)
    and blank ones (empty or only whitespace: warned about, naming the records, and kept).

    Returns the records (captions dropped when ``skip``), ``{split: unencodable captions}`` and
    ``{split: blank captions}``.
    """
    bad = [(r, j, why) for r in records for j, c in enumerate(r.captions) if (why := _unencodable(c)) is not None]
    dropped: dict[str, int] = {}
    if bad:
        first, j, why = bad[0]
        others = sorted({r.index for r, _, _ in bad[1:]} - {first.index})
        more = (f"; {len(bad)} such captions in all (also records {others[:_MAX_LISTED]}"
                + (" ..." if len(others) > _MAX_LISTED else "") + ")") if len(bad) > 1 else ""
        what = (f"{spec.display_name}: caption {j} of {_where(spec, first)} in {ann} cannot be encoded as UTF-8: "
                f"{why}{more}")
        if not skip:
            raise DatasetFormatError(f"{what}. Expected text that is valid Unicode (fix the record's escape "
                                     f"sequences), or set data.skip_unreadable: true to drop such captions (counted)")
        drop = {(r.index, j) for r, j, _ in bad}
        touched = {i for i, _ in drop}
        records = [replace(r, captions=[c for j, c in enumerate(r.captions) if (r.index, j) not in drop])
                   if r.index in touched else r for r in records]
        counts = Counter(r.split for r, _, _ in bad)
        dropped = {s: counts[s] for s in SPLITS if counts[s]}
        logger.warning("%s. Dropped %d such captions (data.skip_unreadable: true): %s", what, len(bad),
                       ", ".join(f"{n} in {s}" for s, n in dropped.items()))
    blank = [(r, j) for r in records for j, c in enumerate(r.captions) if not c.strip()]
    blanks: dict[str, int] = {}
    if blank:
        counts = Counter(r.split for r, _ in blank)
        blanks = {s: counts[s] for s in SPLITS if counts[s]}
        shown = "; ".join(f"caption {j} of {_where(spec, r)}" for r, j in blank[:5])
        more = f"; ... ({len(blank) - 5} more)" if len(blank) > 5 else ""
        logger.warning("%s: %d captions in %s are empty or only whitespace (%s): each is a training pair or a query "
                       "with no words (the text tower sees only its start and end tokens). Kept; fix or remove them "
                       "in the file. First: %s%s", spec.display_name, len(blank), ann,
                       ", ".join(f"{n} in {s}" for s, n in blanks.items()), shown, more)
    return records, dropped, blanks


def _file_digests(paths: Iterable[str]) -> dict[str, str]:
    """``{path: blake2b of its bytes}``, read in parallel (the files were just decoded: they are in the page cache)."""
    paths = sorted(set(paths))
    with ThreadPoolExecutor(max_workers=min(32, (os.cpu_count() or 1) + 4)) as pool:
        return dict(zip(paths, pool.map(file_digest, paths)))


def _check_leakage(spec: DatasetFormat, ann: Path, records: list[_Record], *, by_content: bool) -> dict[str, int]:
    """Warn about images listed both in train and in an evaluation split (val/test): the model
    is then evaluated on images it trained on, and its R@K/mAP overstate it. ``{split: images}``
    of each evaluation split that shares images with train; only the splits loaded are compared.

    Always by path; with ``by_content`` (every image was decoded at load, so reading the files again
    is cheap) also by the bytes of the files, which finds a copy under another name. Only files of
    a size that appears on both sides are read.
    """
    train = {r.path: r for r in records if r.split == "train"}
    shared = [(r, train[r.path], "both list") for r in records if r.split != "train" and r.path in train]
    if by_content:
        size = {r.path: os.path.getsize(r.path) for r in records}
        evaluated = [r for r in records if r.split != "train" and r.path not in train]
        both = {size[r.path] for r in evaluated} & {size[p] for p in train}
        digests = _file_digests(r.path for r in records if size[r.path] in both)
        by_digest = {digests[p]: t for p, t in train.items() if p in digests}
        shared += [(r, by_digest[digests[r.path]], "hold the same bytes:") for r in evaluated
                   if r.path in digests and digests[r.path] in by_digest]
    if not shared:
        return {}
    counts = Counter(r.split for r, _, _ in shared)
    leaked = {s: counts[s] for s in SPLITS if counts[s]}
    shown = "; ".join(f"record {r.index} (split {r.split}) and record {t.index} (split train) {how} "
                      + (f"{spec.image_key}={r.rel_path!r}" if how == "both list" else f"{r.rel_path!r} and "
                         f"{t.rel_path!r}") for r, t, how in shared[:5])
    more = f"; ... ({len(shared) - 5} more)" if len(shared) > 5 else ""
    logger.warning("%s: %d images in %s are both in train and in an evaluation split (%s): the model is evaluated on "
                   "images it trained on, so R@K/mAP on these splits overstate it. Give each image one split. "
                   "First: %s%s", spec.display_name, len(shared), ann,
                   ", ".join(f"{n} in {s}" for s, n in leaked.items()), shown, more)
    return leaked


def _caption_key(caption: str) -> str:
    # The CLIP tokenizer lower-cases and collapses whitespace, so these captions are the same query.
    return " ".join(caption.lower().split())


def _check_duplicates(spec: DatasetFormat, ann: Path, records: list[_Record],
                      policy: str) -> tuple[list[_Record], dict[str, int]]:
    """Find (image, caption) pairs listed more than once in a split; warn, refuse or drop the repeats.

    A repeated pair is one more training sample and one more query (and, for a repeated
    record, one more gallery image): it weighs that pair twice in the loss and in R@K/mAP.
    ``drop`` keeps the first occurrence of each pair; a record all of whose captions are
    repeats is removed whole, since its image is already in the split.
    """
    first: dict[tuple[str, str, str], int] = {}
    kept: list[_Record] = []
    repeats: list[tuple[_Record, str, int]] = []  # (record, caption, index of the record it repeats)
    whole: list[_Record] = []
    for r in records:
        fresh = []
        for cap in r.captions:
            key = (r.split, r.path, _caption_key(cap))
            if key in first:
                repeats.append((r, cap, first[key]))
            else:
                first[key] = r.index
                fresh.append(cap)
        if r.captions and not fresh:
            whole.append(r)
        if policy == "drop" and len(fresh) < len(r.captions):
            if fresh:
                kept.append(replace(r, captions=fresh))
        else:
            kept.append(r)
    if not repeats:
        return records, {}
    counts = Counter(r.split for r, _, _ in repeats)
    per_split = ", ".join(f"{counts[s]} in {s}" for s in SPLITS if counts[s])
    examples = "; ".join(
        f"record {r.index} " + ("lists a caption twice" if j == r.index else f"repeats record {j}")
        + f" ({spec.image_key}={r.rel_path!r}, caption {cap!r:.60})" for r, cap, j in repeats[:3])
    what = (f"{spec.display_name}: {len(repeats)} (image, caption) pairs in {ann} repeat an earlier pair of the same "
            f"split ({per_split}; {len(whole)} records repeat an earlier record entirely). Repeats weigh a pair twice "
            f"in training and in R@K/mAP. First: {examples}")
    if policy == "error":
        raise DatasetFormatError(f"{what}. Set data.duplicates: drop in the recipe to keep only the first of each "
                                 f"pair, or data.duplicates: warn to keep them all")
    if policy == "drop":
        logger.warning("%s. Dropped the repeats (data.duplicates: drop): %d captions, %d whole records",
                       what, len(repeats), len(whole))
    else:
        logger.warning("%s. Kept them (data.duplicates: warn); data.duplicates: drop keeps only the first of each "
                       "pair, data.duplicates: error refuses", what)
    return kept, {s: counts[s] for s in SPLITS if counts[s]}


def _check_not_empty(spec: DatasetFormat, ann: Path, wanted: tuple[str, ...], in_file: Counter,
                     skipped: dict[str, list[str]], kept: dict[str, list[_Record]]) -> None:
    """Refuse a split that ends up with nothing to train or evaluate on, saying why, in one error.

    ``in_file``: records per split in the file; ``skipped``: per split, the kinds of the
    images dropped as unreadable; ``kept``: per split, the records left.
    """
    problems = []
    for s in wanted:
        recs = kept[s]
        if recs and any(r.captions for r in recs):
            continue
        part = "train" if s == "train" else f"{s} (gallery/queries)"
        if not in_file[s]:
            why = f"no record in the file has split {s!r}"
        elif not recs:
            why = f"all {in_file[s]} of its images are unreadable and were skipped ({_kind_counts(skipped[s])})"
        else:
            unread = f", {len(skipped[s])} more skipped as unreadable" if skipped[s] else ""
            why = (f"all {len(recs)} of its remaining records have an empty caption list{unread}, so there is "
                   + ("nothing to train on" if s == "train" else "no query to evaluate"))
        problems.append(f"  the {part} split is empty: {why}")
    if problems:
        raise DatasetFormatError(
            f"{spec.display_name}: {len(problems)} of the splits asked for ({', '.join(wanted)}) would be empty "
            f"after loading {ann}:\n" + "\n".join(problems)
            + f"\nExpected records with these splits, readable images and at least one caption each "
              f"({spec.layout()})")


# ----------------------------------------------------------------------------- splits

_STR, _INT = datasets.Value("string"), datasets.Value("int64")
TRAIN_FEATURES = datasets.Features({"image_path": _STR, "caption": _STR, "pid": _INT, "image_id": _INT})
GALLERY_FEATURES = datasets.Features({"image_path": _STR, "pid": _INT, "image_id": _INT})
QUERY_FEATURES = datasets.Features({"caption": _STR, "pid": _INT, "image_id": _INT})


def _dataset(columns: dict[str, list], features: datasets.Features, spec: DatasetFormat, desc: str) -> datasets.Dataset:
    info = datasets.DatasetInfo(description=desc, dataset_name=spec.display_name, features=features)
    return datasets.Dataset.from_dict(columns, features=features, info=info)


def _train_split(recs: list[_Record], spec: DatasetFormat, desc: str) -> datasets.Dataset:
    # A record with no caption yields no sample (reported by _check_captions); leaving it out
    # before numbering keeps pids and image ids contiguous.
    recs = [r for r in recs if r.captions]
    # Rank of the original id: contiguous 0..N-1 even if some ids are absent (e.g. skipped images).
    pid_of = {orig: i for i, orig in enumerate(sorted({r.id for r in recs}))}
    cols: dict[str, list] = {k: [] for k in TRAIN_FEATURES}
    for image_id, r in enumerate(recs):
        for cap in r.captions:
            cols["image_path"].append(r.path)
            cols["caption"].append(cap)
            cols["pid"].append(pid_of[r.id])
            cols["image_id"].append(image_id)
    return _dataset(cols, TRAIN_FEATURES, spec, desc)


def _eval_splits(recs: list[_Record], spec: DatasetFormat, desc: str) -> tuple[datasets.Dataset, datasets.Dataset]:
    gallery: dict[str, list] = {k: [] for k in GALLERY_FEATURES}
    queries: dict[str, list] = {k: [] for k in QUERY_FEATURES}
    for image_id, r in enumerate(recs):
        gallery["image_path"].append(r.path)
        gallery["pid"].append(r.id)
        gallery["image_id"].append(image_id)
        for cap in r.captions:
            queries["caption"].append(cap)
            queries["pid"].append(r.id)
            queries["image_id"].append(image_id)
    return _dataset(gallery, GALLERY_FEATURES, spec, desc), _dataset(queries, QUERY_FEATURES, spec, desc)


@dataclass(frozen=True)
class LoadReport:
    """What :func:`load_pedes` found in the files and what it did about it (each also logged as a warning)."""

    dataset: str  # display name
    annotation: str  # the annotation file read
    splits: tuple[str, ...]  # the splits loaded
    decoded_splits: tuple[str, ...]  # splits whose images were all decoded at load (val/test always)
    skipped: dict[str, str]  # absolute image path -> kind (see images.UNREADABLE_KINDS), data.skip_unreadable
    empty_captions: dict[str, int]  # split -> records with an empty caption list (kept, see _check_captions)
    duplicates: dict[str, int]  # split -> repeated (image, caption) pairs found
    duplicates_policy: str  # what was done about them: warn (kept) | drop
    tiny_images: dict[str, int] = field(default_factory=dict)  # split -> decoded images under TINY_SIDE px (kept)
    unencodable_captions: dict[str, int] = field(default_factory=dict)  # split -> dropped (data.skip_unreadable)
    blank_captions: dict[str, int] = field(default_factory=dict)  # split -> empty/whitespace captions (kept)
    leaked_images: dict[str, int] = field(default_factory=dict)  # eval split -> its images also listed in train

    def skipped_by_kind(self) -> dict[str, int]:
        counts = Counter(self.skipped.values())
        return {k: counts[k] for k in UNREADABLE_KINDS if counts[k]}

    def notes(self) -> list[str]:
        """One line per finding, for :func:`summarize` and run logs; empty when the files were clean."""
        out = []
        if self.skipped:
            out.append(f"{len(self.skipped):,} unreadable images skipped at load ("
                       + ", ".join(f"{n} {k}" for k, n in self.skipped_by_kind().items()) + ")")
        if self.empty_captions:
            out.append("records with an empty caption list: "
                       + ", ".join(f"{n} in {s}" for s, n in self.empty_captions.items()))
        if self.duplicates:
            done = "dropped" if self.duplicates_policy == "drop" else "kept"
            out.append(f"repeated (image, caption) pairs ({done}): "
                       + ", ".join(f"{n} in {s}" for s, n in self.duplicates.items()))
        for counts, what in ((self.unencodable_captions, "captions that cannot be encoded (dropped)"),
                             (self.blank_captions, "empty or whitespace-only captions (kept)"),
                             (self.tiny_images, f"images under {TINY_SIDE} pixels on a side (kept)"),
                             (self.leaked_images, "images also listed in train (train/evaluation leakage)")):
            if counts:
                out.append(f"{what}: " + ", ".join(f"{n} in {s}" for s, n in counts.items()))
        return out


_last_skipped: list[str] = []


def last_skipped() -> int:
    """How many images the most recent :func:`load_pedes` call in this process dropped."""
    return len(_last_skipped)


def _wanted_splits(spec: DatasetFormat, splits: Iterable[str] | None) -> tuple[str, ...]:
    if splits is None:
        return spec.splits
    asked = [splits] if isinstance(splits, str) else list(splits)
    unknown = [s for s in asked if s not in SPLITS]
    if unknown:
        raise ValueError(f"unknown split name(s) {unknown}; splits are among {list(SPLITS)}")
    wanted = tuple(s for s in spec.splits if s in asked)
    if not wanted:
        raise DatasetFormatError(f"{spec.display_name} has none of the splits asked for ({asked}); "
                                 f"its splits are {list(spec.splits)}")
    return wanted


class PedesSplits(datasets.DatasetDict):
    """The splits of one dataset, and what loading found: ``load_report`` (:class:`LoadReport`)
    and ``skipped_images`` (the paths dropped by ``skip_unreadable``)."""

    load_report: LoadReport | None = None
    skipped_images: list[str] = []


def load_pedes(
    name: str,
    root: str | os.PathLike,
    *,
    splits: Iterable[str] | None = None,
    skip_unreadable: bool = False,
    verify_images: bool = False,
    duplicates: str = "warn",
) -> datasets.DatasetDict:
    """Load ``<root>/<dataset folder>`` into train / {val,test}_gallery / {val,test}_queries splits.

    ``name`` is any spelling :func:`canonical_dataset_name` accepts. ``splits`` (a subset of
    ``train``, ``val``, ``test``; default all the dataset has) limits what is built and
    checked: an evaluation that reads only ``test`` need not check train images, and a
    split the dataset does not have (ICFG-PEDES' val) is left out for the caller's fallback.

    Checked at load, before anything trains:

    - every image exists; val/test images are also decoded (they are few, and a bad one
      would otherwise be found only after training); train images are decoded when
      ``verify_images`` or ``skip_unreadable`` is set (parallel; the only way to know a
      train image can be dropped is to read it). An unreadable image is an error listing
      all of them, or with ``skip_unreadable`` a warning with the counts by kind;
    - records with an empty caption list: a warning with counts (see :func:`_check_captions`);
    - captions that cannot be encoded: an error naming the record, or with ``skip_unreadable``
      dropped and counted; blank captions, tiny images and images in train and val/test: warnings
      naming the records (:func:`_check_caption_text`, :func:`_warn_tiny`, :func:`_check_leakage`);
    - repeated (image, caption) pairs: ``duplicates`` = ``warn`` (keep, warn), ``error``
      (refuse) or ``drop`` (keep the first of each, warn);
    - a split left with nothing to train or evaluate on is an error naming it and why.

    The findings are on the result as ``dsd.load_report`` (:class:`LoadReport`); the
    dropped image paths as ``dsd.skipped_images`` and their count in :func:`last_skipped`.
    """
    global _last_skipped
    if duplicates not in DUPLICATE_POLICIES:
        raise ValueError(f"duplicates must be one of {list(DUPLICATE_POLICIES)}, got {duplicates!r}")
    spec = DATASETS[canonical_dataset_name(name)]
    wanted = _wanted_splits(spec, splits)
    root = Path(root).expanduser().resolve()
    _folder, ann, imgs = _find_dataset_files(spec, root)
    listed = [r for r in _read_records(spec, ann, imgs) if r.split in wanted]
    in_file = Counter(r.split for r in listed)
    by_split: dict[str, list[_Record]] = {s: [r for r in listed if r.split == s] for s in wanted}
    # Splits with no records or no captions are known before any image is read: refuse them first.
    _check_not_empty(spec, ann, wanted, in_file, {s: [] for s in wanted}, by_split)
    decode_train = verify_images or skip_unreadable

    records, skipped, tiny = _check_images(spec, ann, imgs, listed, skip=skip_unreadable,
                                           decode=lambda r: r.split != "train" or decode_train)
    empty_captions = _check_captions(spec, ann, records)  # lists empty in the file, before any caption is dropped
    records, unencodable, blank = _check_caption_text(spec, ann, records, skip=skip_unreadable)
    leaked = _check_leakage(spec, ann, records, by_content=decode_train)
    records, repeats = _check_duplicates(spec, ann, records, duplicates)
    by_split = {s: [r for r in records if r.split == s] for s in wanted}
    skipped_kinds = {s: [skipped[r.path] for r in listed if r.split == s and r.path in skipped] for s in wanted}
    _check_not_empty(spec, ann, wanted, in_file, skipped_kinds, by_split)

    _last_skipped = list(skipped)
    report = LoadReport(
        dataset=spec.display_name, annotation=str(ann), splits=wanted,
        decoded_splits=tuple(s for s in wanted if s != "train" or decode_train),
        skipped=dict(skipped), empty_captions=empty_captions, duplicates=repeats,
        duplicates_policy="drop" if duplicates == "drop" else "warn", tiny_images=tiny,
        unencodable_captions=unencodable, blank_captions=blank, leaked_images=leaked)

    def desc(split: str) -> str:
        notes = "".join(f"; {n}" for n in report.notes())
        return f"{spec.display_name} {split} from {ann}{notes}"

    out = PedesSplits()
    for s in wanted:
        if s == "train":
            out["train"] = _train_split(by_split[s], spec, desc("train"))
        else:
            out[f"{s}_gallery"], out[f"{s}_queries"] = _eval_splits(by_split[s], spec, desc(s))
    out.skipped_images = list(skipped)
    out.load_report = report
    return out


# ----------------------------------------------------------------------------- reporting

def _column(ds: datasets.Dataset, name: str) -> list[Any]:
    return list(ds.with_format(None)[name])  # bypass any transform set by with_retrieval_transforms


def summarize(dsd: datasets.DatasetDict) -> str:
    """A table of identities / images / captions per split, comparable with the published sizes."""
    title = next((ds.info.dataset_name for ds in dsd.values() if ds.info.dataset_name), "dataset")
    rows: list[tuple[str, int, int, int]] = []
    if "train" in dsd:
        tr = dsd["train"]
        rows.append(("train", len(set(_column(tr, "pid"))), len(set(_column(tr, "image_id"))), tr.num_rows))
    for s in ("val", "test"):
        g, q = dsd.get(f"{s}_gallery"), dsd.get(f"{s}_queries")
        if g is not None and q is not None:
            rows.append((s, len(set(_column(g, "pid"))), g.num_rows, q.num_rows))
    lines = [f"{title:<14}{'identities':>12}{'images':>10}{'captions':>10}"]
    lines += [f"  {s:<12}{p:>12,}{i:>10,}{c:>10,}" for s, p, i, c in rows]
    report = dsd.load_report if isinstance(dsd, PedesSplits) else None
    if report is not None:
        lines += [f"  ({note})" for note in report.notes()]
    return "\n".join(lines)
