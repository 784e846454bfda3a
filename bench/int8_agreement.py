"""INT8 against PyTorch, query by query: do the INT8 graphs and the PyTorch model put the same gallery
file first for each caption of a split? (issue 26's bar: the same top-1 file for >= 99% of queries)

    kd-trainer export-onnx runs/demo/student_kd --out /tmp/sk_onnx --int8
    python bench/int8_agreement.py runs/demo/student_kd /tmp/sk_onnx --root ./data

The split's images are copied into one gallery folder; both models index it (kd-trainer index) and
search every caption of the split (kd-trainer search, top 1). Prints how many captions get the same
top-1 file, and the same person (SynthPEDES file names start with the person id).
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


def top1_files(model: str, variant: str | None, gallery: Path, captions: list[str], work: Path) -> list[str]:
    encoder = load_encoder(model, onnx_variant=variant)
    index = work / f"{variant or 'torch'}.index"
    build_index(encoder, gallery, index)
    return [hits[0].path for hits in Searcher(load_index(index), encoder).search(captions, top=1)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="the PyTorch model (a run folder or any checkpoint kd-trainer eval reads)")
    p.add_argument("onnx", help="its kd-trainer export-onnx folder")
    p.add_argument("--variant", default="int8", help="which graphs of the export (default int8)")
    p.add_argument("--root", default="./data", help="the data root holding SynthPEDES/")
    p.add_argument("--split", default="test")
    ns = p.parse_args()
    root = Path(ns.root) / "SynthPEDES"
    records = [r for r in json.loads((root / "reid_raw.json").read_text()) if r["split"] == ns.split]
    captions = [c for r in records for c in r["captions"]]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        gallery = work / "gallery"
        gallery.mkdir()
        for r in records:
            shutil.copy(root / "imgs" / r["file_path"], gallery / Path(r["file_path"]).name)
        ref = top1_files(ns.model, None, gallery, captions, work)
        got = top1_files(ns.onnx, ns.variant, gallery, captions, work)
    same = sum(a == b for a, b in zip(ref, got))
    same_person = sum(a.split("_")[0] == b.split("_")[0] for a, b in zip(ref, got))
    n = len(captions)
    print(f"{len(records)} gallery images, {n} captions ({ns.split}): same top-1 file {same}/{n} "
          f"({100 * same / n:.1f}%), same person {same_person}/{n} ({100 * same_person / n:.1f}%)")


if __name__ == "__main__":
    main()
