"""The ``kd-trainer`` command.

    kd-trainer train RECIPE [key.sub=value ...]   run a recipe (same as kd_trainer/run.py)
    kd-trainer RECIPE [key.sub=value ...]         shorthand for train
    kd-trainer eval RUN_DIR --dataset NAME --root DIR [--split test]
    kd-trainer demo                               SynthPEDES: teacher, student without/with KD, table
    kd-trainer terms | archs                      list the loss terms / named architectures
    kd-trainer report RUN_OR_DIR [...] [--out reports/] [--minp]   results table + loss plots
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

COMMANDS = ("train", "eval", "demo", "terms", "archs", "report")


def _input_errors() -> tuple[type[BaseException], ...]:
    from kd_trainer.data.formats import DatasetFormatError
    from kd_trainer.models.checkpoint import CheckpointError
    from kd_trainer.recipe import RecipeError

    return (RecipeError, DatasetFormatError, CheckpointError)


def _eval(ns: argparse.Namespace) -> None:
    from kd_trainer.data import canonical_dataset_name, load_pedes, with_retrieval_transforms
    from kd_trainer.data.collator import collate_retrieval
    from kd_trainer.evaluation import evaluate_retrieval, format_metrics
    from kd_trainer.models.checkpoint import load_model

    model = load_model(ns.model)
    name = canonical_dataset_name(ns.dataset)
    dsd = with_retrieval_transforms(load_pedes(name, ns.root), image_size=model.image_size, augment=False,
                                    context_length=model.context_length, dataset_name=name)
    if f"{ns.split}_gallery" not in dsd:
        raise SystemExit(f"{ns.dataset} has no {ns.split!r} split (it has {sorted(dsd)})")
    metrics = evaluate_retrieval(model, dsd[f"{ns.split}_gallery"], dsd[f"{ns.split}_queries"],
                                 batch_size=ns.batch_size, collate_fn=collate_retrieval)
    print(format_metrics({f"{Path(ns.model).name} on {name}/{ns.split}": metrics}))
    out = Path(ns.output) if ns.output else Path(ns.model) / f"eval_{name}_{ns.split}.json"
    out.write_text(json.dumps(metrics, indent=2))
    print(f"wrote {out}")


def _report(ns: argparse.Namespace) -> None:
    """Table to stdout, files under --out; skipped runs as warnings, bad input as exit 2 (no traceback)."""
    import warnings

    from kd_trainer.report import PlotDependencyError, ReportError, SkippedRunWarning, write_report

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SkippedRunWarning)
        try:
            written = write_report(ns.runs, ns.out, with_minp=ns.minp, duplicates=ns.duplicates,
                                   plots=not ns.no_plots, weighted=ns.weighted)
        except (ReportError, PlotDependencyError) as e:
            error: BaseException | None = e
        else:
            error = None
    for w in caught:
        if issubclass(w.category, SkippedRunWarning):
            print(f"warning: {w.message}", file=sys.stderr)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if error is not None:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2)
    print(written["table"])
    print(f"wrote {written['results']}")
    for path in written["plots"].values():
        print(f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in COMMANDS and not argv[0].startswith("-"):
        argv.insert(0, "train")  # python -m kd_trainer recipe.yaml ...
    parser = argparse.ArgumentParser(prog="kd-trainer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="run a recipe")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*")
    p = sub.add_parser("eval", help="evaluate a saved model on a dataset split")
    p.add_argument("model", help="a kd_trainer output folder")
    p.add_argument("--dataset", required=True)
    p.add_argument("--root", default="./data")
    p.add_argument("--split", default="test", choices=["val", "test"])
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--output", help="metrics JSON (default: <model>/eval_<dataset>_<split>.json)")
    p = sub.add_parser("demo", help="SynthPEDES demo: teacher, student without KD, student with KD")
    p.add_argument("--root", default="./data")
    p.add_argument("--runs", default="./runs/demo")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides applied to all three recipes")
    sub.add_parser("terms", help="list the registered loss terms")
    sub.add_parser("archs", help="list the named architectures")
    p = sub.add_parser("report", help="results table (methods x datasets) and loss-curve plots of finished runs")
    p.add_argument("runs", nargs="+", metavar="RUN_OR_DIR",
                   help="run folders, or folders searched recursively for them")
    p.add_argument("--out", default="reports", help="folder for results.md and <run>_losses.png (default: reports)")
    p.add_argument("--minp", action="store_true", help="append mINP to each table cell")
    p.add_argument("--duplicates", choices=["error", "split"], default="error",
                   help="two runs with one method label on one dataset: stop (default) or give each its own row")
    p.add_argument("--weighted", action="store_true", help="plot the weighted loss terms")
    p.add_argument("--no-plots", action="store_true", help="only results.md (no matplotlib needed)")
    ns = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        _dispatch(ns)
    except _input_errors() as e:  # a bad recipe, dataset or checkpoint: the message says it all
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def _dispatch(ns: argparse.Namespace) -> None:
    if ns.command == "train":
        from kd_trainer.run import main as run_main

        run_main([ns.recipe, *ns.overrides])
    elif ns.command == "eval":
        _eval(ns)
    elif ns.command == "demo":
        from kd_trainer.demo import run_demo

        run_demo(root=ns.root, runs=ns.runs, overrides=ns.overrides)
    elif ns.command == "report":
        _report(ns)
    elif ns.command == "terms":
        from kd_trainer.losses import TERMS

        for name, spec in sorted(TERMS.items()):
            print(f"{name:18s} {spec.kind:8s} sides={','.join(spec.sides):16s} "
                  f"T={spec.default_temperature:<5} teacher={'yes' if spec.needs_teacher else 'no'}")
    elif ns.command == "archs":
        from kd_trainer.models.factory import get_architecture, list_architectures

        for name in list_architectures():
            a = get_architecture(name)
            v, t = a["vision_cfg"], a["text_cfg"]
            print(f"{name:16s} embed={a['embed_dim']:<4} image={a.get('image_size')} "
                  f"vision={v['layers']}x{v['width']}/p{v['patch_size']} text={t['layers']}x{t['width']}")


if __name__ == "__main__":
    main()
