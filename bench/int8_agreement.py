"""INT8 against PyTorch, query by query: do the INT8 graphs and the PyTorch model put the same gallery
file first for each caption of a split? (issue 26's bar: the same top-1 file for >= 99% of queries)

    kd-trainer export-onnx runs/demo/student_kd --out /tmp/sk_onnx --int8
    python bench/int8_agreement.py runs/demo/student_kd /tmp/sk_onnx --root ./data --split val

(``kd-trainer export-onnx`` of a run folder also adds a section to the run's model card, README.md;
``kd_trainer.models.onnx.export_onnx`` from Python writes only the export folder, and takes ``int8_scheme``.)

The split's images are copied into one gallery folder; both models index it (kd-trainer index) and
search every caption of the split (kd-trainer search, top 1). Prints how many captions get the same
top-1 file, and the same person (SynthPEDES file names start with the person id). Choose a scheme on
``--split val``; quote ``test`` only for the one chosen (bench/int8_candidates.py measures them all).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from kd_trainer.search.encoders import load_encoder
from kd_trainer.search.index import build_index, load_index
from kd_trainer.search.query import Searcher


def split_gallery(root: str | Path, split: str, dest: Path) -> list[str]:
    """Copy the SynthPEDES ``split``'s images under ``root`` into ``dest`` (created); its captions, in order."""
    folder = Path(root) / "SynthPEDES"
    records = [r for r in json.loads((folder / "reid_raw.json").read_text()) if r["split"] == split]
    if not records:
        raise SystemExit(f"error: {folder / 'reid_raw.json'} has no {split!r} records (expected train, val or test)")
    dest.mkdir(parents=True)
    for r in records:
        shutil.copy(folder / "imgs" / r["file_path"], dest / Path(r["file_path"]).name)
    return [c for r in records for c in r["captions"]]


def top1_files(model: str | Path, variant: str | None, gallery: Path, captions: list[str], work: Path) -> list[str]:
    """The file each caption ranks first, by ``kd-trainer index`` + ``search`` with ``model`` (an ONNX
    export's ``variant`` graphs, or the PyTorch model when ``variant`` is None)."""
    encoder = load_encoder(model, onnx_variant=variant)
    index = work / f"{variant or 'torch'}.index"
    shutil.rmtree(index, ignore_errors=True)
    build_index(encoder, gallery, index)
    return [hits[0].path for hits in Searcher(load_index(index), encoder).search(captions, top=1)]


def agreement(ref: list[str], got: list[str]) -> tuple[int, int]:
    """How many queries get the same top-1 file, and the same person (the id before the file name's ``_``)."""
    same = sum(a == b for a, b in zip(ref, got))
    person = sum(Path(a).name.split("_")[0] == Path(b).name.split("_")[0] for a, b in zip(ref, got))
    return same, person


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="the PyTorch model (a run folder or any checkpoint kd-trainer eval reads)")
    p.add_argument("onnx", help="its kd-trainer export-onnx folder")
    p.add_argument("--variant", default="int8", help="which graphs of the export (default int8)")
    p.add_argument("--root", default="./data", help="the data root holding SynthPEDES/")
    p.add_argument("--split", default="test", choices=["train", "val", "test"],
                   help="the split whose images and captions are compared (choose on val, report on test)")
    ns = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        captions = split_gallery(ns.root, ns.split, work / "gallery")
        n_images = len(list((work / "gallery").iterdir()))
        ref = top1_files(ns.model, None, work / "gallery", captions, work)
        got = top1_files(ns.onnx, ns.variant, work / "gallery", captions, work)
    same, same_person = agreement(ref, got)
    n = len(captions)
    print(f"{n_images} gallery images, {n} captions ({ns.split}): same top-1 file {same}/{n} "
          f"({100 * same / n:.1f}%), same person {same_person}/{n} ({100 * same_person / n:.1f}%)")


if __name__ == "__main__":
    main()
