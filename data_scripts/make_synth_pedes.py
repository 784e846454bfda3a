"""Generate SynthPEDES (the CUHK-PEDES layout) with ``kd_trainer.synthetic.pedes.make_synth_pedes``.

    python data_scripts/make_synth_pedes.py --out data/SynthPEDES
    python data_scripts/make_synth_pedes.py --out /tmp/tiny --identities 20 --height 64 --width 32 --seed 1
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

from kd_trainer.synthetic.pedes import ANNOTATION_FILE, make_synth_pedes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Write the synthetic SynthPEDES dataset (CUHK-PEDES layout).")
    ap.add_argument("--out", required=True, help="dataset folder, e.g. data/SynthPEDES")
    ap.add_argument("--identities", type=int, default=400, help="number of identities (default 400)")
    ap.add_argument("--images-per-identity", "--images", dest="images", type=int, nargs=2, default=(3, 5),
                    metavar=("MIN", "MAX"),
                    help="images per identity, drawn uniformly from MIN..MAX (default 3 5)")
    ap.add_argument("--height", type=int, default=96, help="image height in pixels (default 96)")
    ap.add_argument("--width", type=int, default=48, help="image width in pixels (default 48)")
    ap.add_argument("--split", type=float, nargs=3, default=(0.7, 0.15, 0.15), metavar=("TRAIN", "VAL", "TEST"),
                    help="fractions of identities per split (default 0.7 0.15 0.15)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overwrite", action="store_true", help="regenerate even if the folder holds another SynthPEDES")
    args = ap.parse_args(argv)

    existed = (Path(args.out) / ANNOTATION_FILE).exists() and not args.overwrite
    start = time.perf_counter()
    try:
        out = make_synth_pedes(args.out, num_identities=args.identities, images_per_identity=tuple(args.images),
                               image_size=(args.height, args.width), split_identities=tuple(args.split),
                               seed=args.seed, overwrite=args.overwrite)
    except ValueError as e:
        ap.error(str(e))  # exits with status 2 and the message, as for any bad argument
    seconds = time.perf_counter() - start

    records = json.loads((out / ANNOTATION_FILE).read_text())
    ids: dict[str, set[int]] = collections.defaultdict(set)
    for r in records:
        ids[r["split"]].add(r["id"])
    splits = "/".join(str(len(ids[s])) for s in ("train", "val", "test"))
    how = "reused existing" if existed else f"generated in {seconds:.1f} s"
    print(f"SynthPEDES at {out}: {sum(map(len, ids.values()))} identities ({splits} train/val/test), "
          f"{len(records)} images, {sum(len(r['captions']) for r in records)} captions; {how}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
