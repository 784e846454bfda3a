"""CUHK-PEDES, ICFG-PEDES, RSTPReid and SynthPEDES annotation files -> ``datasets.DatasetDict``.

The layouts are those the IRRA family of codebases reads (``shared/design/data-formats.md``):
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

Bad data is never skipped silently. Every problem raises :class:`DatasetFormatError`
naming the dataset, the file and the record, and saying what was expected. Missing images
are found at load time (one walk of ``imgs/``); undecodable ones at load time with
``verify_images=True``, otherwise when the transform opens them. With
``skip_unreadable=True`` such images are dropped instead, a warning on the
``kd_trainer`` logger gives the count and the first paths, and the dropped paths are kept
on the result as ``dsd.skipped_images`` (also ``last_skipped()`` for the latest load, and
in each split's ``info.description``).
"""

from __future__ import annotations

import json
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
from PIL import Image

__all__ = [
    "DATASETS",
    "DatasetFormat",
    "DatasetFormatError",
    "canonical_dataset_name",
    "last_skipped",
    "load_pedes",
    "open_image",
    "summarize",
]

logger = logging.getLogger("kd_trainer")

_MAX_LISTED = 10  # problems listed one by one in an error message; the rest are counted


class DatasetFormatError(ValueError):
    """A dataset on disk does not have the layout its loader expects."""


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
        # Synthetic stand-in written by kd_trainer.data.synth in the CUHK-PEDES layout.
        DatasetFormat("synth_pedes", "SynthPEDES", "SynthPEDES", ("reid_raw.json",), "file_path",
                      ("train", "val", "test"), id_base=1, captions_per_image=2),
    )
}


def _squash(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


_BY_SQUASHED = {_squash(k): k for k in DATASETS} | {_squash(f.display_name): k for k, f in DATASETS.items()}


def canonical_dataset_name(name: str) -> str:
    """``"CUHK-PEDES"``, ``"cuhk-pedes"``, ``"cuhk_pedes"`` ... -> ``"cuhk_pedes"`` (case, ``-``, ``_`` ignored)."""
    key = _BY_SQUASHED.get(_squash(str(name)))
    if key is None:
        valid = ", ".join(f"{k} ({f.display_name})" for k, f in DATASETS.items())
        raise ValueError(f"Unknown dataset {name!r}; valid names: {valid}")
    return key


# ----------------------------------------------------------------------------- images

def open_image(path: str | os.PathLike, dataset_name: str = "") -> Image.Image:
    """Decode an image fully and return it as RGB; failures name the dataset and the file."""
    who = f"{dataset_name}: " if dataset_name else ""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")  # convert() forces the full decode, so truncation shows here
    except FileNotFoundError:
        raise DatasetFormatError(
            f"{who}image file {os.fspath(path)} is missing; expected the file named by the annotation "
            f"record, under the dataset's imgs/ folder"
        ) from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DatasetFormatError(
            f"{who}cannot decode image {os.fspath(path)} ({type(e).__name__}: {e}); expected an image file "
            f"PIL can read (JPEG/PNG). load_pedes(..., verify_images=True, skip_unreadable=True) drops such "
            f"images at load time and reports how many"
        ) from e


def _undecodable(path: str) -> str | None:
    try:
        open_image(path)
    except DatasetFormatError as e:
        cause = e.__cause__
        return f"{type(cause).__name__}: {cause}" if cause is not None else "file vanished"
    return None


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
        seen = f"; {root} contains {here}" if here is not None else f"; {root} does not exist either"
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
        with open(ann, encoding="utf-8") as fh:
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


def _drop_unreadable(
    spec: DatasetFormat, ann: Path, imgs: Path, records: list[_Record], *, skip: bool, verify: bool
) -> tuple[list[_Record], list[str]]:
    """Records whose image exists (and decodes, if ``verify``); raise or drop the others."""
    on_disk = _scan_files(str(imgs))
    # The walk misses nothing a stat would find except odd cases (case-insensitive file systems,
    # paths leaving imgs/ through ".."), so only the misses are checked again one by one.
    missing = [r for r in records if r.rel_path not in on_disk and not os.path.isfile(r.path)]
    problems: dict[int, str] = {r.index: "missing" for r in missing}
    if missing and not skip:
        raise DatasetFormatError(_problem_report(spec, ann, imgs, records, problems, "missing"))

    if verify:
        todo = [r for r in records if r.index not in problems]
        with ThreadPoolExecutor(max_workers=min(32, (os.cpu_count() or 1) + 4)) as pool:
            for r, err in zip(todo, pool.map(_undecodable, [r.path for r in todo])):
                if err is not None:
                    problems[r.index] = f"cannot decode image: {err}"
        if not skip and len(problems) > len(missing):
            undecodable = {k: v for k, v in problems.items() if v != "missing"}
            raise DatasetFormatError(_problem_report(spec, ann, imgs, records, undecodable, "undecodable"))

    if not problems:
        return records, []
    skipped = [r.path for r in records if r.index in problems]
    shown = ", ".join(skipped[:5]) + (f", ... ({len(skipped) - 5} more)" if len(skipped) > 5 else "")
    logger.warning("%s: skipped %d of %d images listed in %s (missing%s; skip_unreadable=True): %s",
                   spec.display_name, len(skipped), len(records), ann, " or undecodable" if verify else "", shown)
    return [r for r in records if r.index not in problems], skipped


def _problem_report(spec: DatasetFormat, ann: Path, imgs: Path, records: list[_Record],
                    problems: dict[int, str], kind: str) -> str:
    lines = [f"{spec.display_name}: {len(problems)} of {len(records)} images listed in {ann} are {kind}:"]
    by_index = {r.index: r for r in records}
    for idx in sorted(problems)[:_MAX_LISTED]:
        r = by_index[idx]
        detail = "" if problems[idx] == "missing" else f" ({problems[idx]})"
        lines.append(f"  record {idx} ({spec.image_key}={r.rel_path!r}): expected file {r.path}{detail}")
    if len(problems) > _MAX_LISTED:
        lines.append(f"  ... and {len(problems) - _MAX_LISTED} more")
    lines.append(f"Expected every record's {spec.image_key!r} to name a readable image under {imgs}. "
                 f"Pass skip_unreadable=True to drop these images (the count is reported).")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- splits

_STR, _INT = datasets.Value("string"), datasets.Value("int64")
TRAIN_FEATURES = datasets.Features({"image_path": _STR, "caption": _STR, "pid": _INT, "image_id": _INT})
GALLERY_FEATURES = datasets.Features({"image_path": _STR, "pid": _INT, "image_id": _INT})
QUERY_FEATURES = datasets.Features({"caption": _STR, "pid": _INT, "image_id": _INT})


def _dataset(columns: dict[str, list], features: datasets.Features, spec: DatasetFormat, desc: str) -> datasets.Dataset:
    info = datasets.DatasetInfo(description=desc, dataset_name=spec.display_name, features=features)
    return datasets.Dataset.from_dict(columns, features=features, info=info)


def _train_split(recs: list[_Record], spec: DatasetFormat, desc: str) -> datasets.Dataset:
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


_last_skipped: list[str] = []


def last_skipped() -> int:
    """How many images the most recent :func:`load_pedes` call in this process dropped."""
    return len(_last_skipped)


def load_pedes(
    name: str,
    root: str | os.PathLike,
    *,
    skip_unreadable: bool = False,
    verify_images: bool = False,
) -> datasets.DatasetDict:
    """Load ``<root>/<dataset folder>`` into train / {val,test}_gallery / {val,test}_queries splits.

    ``name`` is any spelling :func:`canonical_dataset_name` accepts. Missing image files are
    always checked; ``verify_images=True`` also decodes every image (slow on the full
    datasets). ``skip_unreadable=True`` drops bad images instead of raising; the dropped
    absolute paths are in ``dsd.skipped_images`` and their count in :func:`last_skipped`.
    """
    global _last_skipped
    spec = DATASETS[canonical_dataset_name(name)]
    root = Path(root).expanduser().resolve()
    _folder, ann, imgs = _find_dataset_files(spec, root)
    records = _read_records(spec, ann, imgs)
    records, skipped = _drop_unreadable(spec, ann, imgs, records, skip=skip_unreadable, verify=verify_images)
    _last_skipped = skipped

    def desc(split: str) -> str:
        note = f"; {len(skipped)} unreadable images skipped at load" if skipped else ""
        return f"{spec.display_name} {split} from {ann}{note}"

    by_split: dict[str, list[_Record]] = {s: [] for s in spec.splits}
    for r in records:
        by_split[r.split].append(r)
    for s, recs in by_split.items():
        if not recs:
            logger.warning("%s: no records with split %r in %s; the %s split(s) will be empty",
                           spec.display_name, s, ann, s if s == "train" else f"{s}_gallery/{s}_queries")

    out = datasets.DatasetDict()
    for s in spec.splits:
        if s == "train":
            out["train"] = _train_split(by_split[s], spec, desc("train"))
        else:
            out[f"{s}_gallery"], out[f"{s}_queries"] = _eval_splits(by_split[s], spec, desc(s))
    out.skipped_images = list(skipped)
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
    skipped = getattr(dsd, "skipped_images", None)
    if skipped:
        lines.append(f"  ({len(skipped):,} unreadable images skipped at load)")
    return "\n".join(lines)
