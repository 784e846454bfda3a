"""The ``kd-trainer`` command.

    kd-trainer train RECIPE [key.sub=value ...]   run a recipe (same as accelerate launch kd_trainer/run.py)
    kd-trainer RECIPE [key.sub=value ...]         shorthand for train
    kd-trainer eval MODEL --dataset NAME --root DIR [--split test] [--teacher T] [--pairings ...]
    kd-trainer demo                               SynthPEDES: teacher, student without/with KD, table
    kd-trainer cache-teacher RECIPE [--out DIR]   embed the train set with the teacher once (teacher.cache)
    kd-trainer plan RECIPE [key.sub=value ...] [--json]  the resolved run: every decision, without training
    kd-trainer terms | archs                      list the loss terms / named architectures
    kd-trainer report RUN_OR_DIR [...] [--out reports/] [--minp]   results table (+ cost), loss plots, index.html
    kd-trainer export-onnx MODEL --out DIR [--int8 [--int8-scheme weight-only|calibrated]] [--fp16] [--dataset NAME --root DIR]   ONNX graphs, checked
    kd-trainer eval --onnx DIR --dataset NAME --root DIR [--onnx-variant int8]   evaluate an exported folder
    kd-trainer index MODEL --gallery DIR --out INDEX [--onnx-variant int8]   embed a folder of images once
    kd-trainer search INDEX "a woman in a red coat" [--top 10] [--html OUT]   rank the folder for a sentence
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path

import yaml

from kd_trainer.data import DatasetFormatError, canonical_dataset_name, load_pedes, with_retrieval_transforms
from kd_trainer.data.collator import collate_retrieval
from kd_trainer.data.formats import DATASETS, squash_dataset_name
from kd_trainer.demo import SEEDS as DEMO_SEEDS
from kd_trainer.demo import run_demo, train_teacher
from kd_trainer.distill.resolved import resolve_run
from kd_trainer.distill.cache import build_teacher_cache
from kd_trainer.evaluation import evaluate_retrieval, format_metrics
from kd_trainer.losses import TERMS
from kd_trainer.models.factory import get_architecture, list_architectures
from kd_trainer.models.finite import require_finite_weights
from kd_trainer.models.loading import CheckpointError, model_from_checkpoint
from kd_trainer.models.export import update_model_card
from kd_trainer.models.onnx.calibrated import calibrated_int8, calibration_sample
from kd_trainer.models.onnx.quantize import CALIBRATED_INT8_SCHEMES, DEFAULT_INT8_SCHEME, INT8_SCHEME_NAMES
from kd_trainer.models.onnx import (
    VARIANTS,
    DeployDependencyError,
    ExportVerificationError,
    OnnxDualEncoder,
    OnnxExportError,
    check_limits,
    check_output_folder,
    evaluate_onnx,
    export_onnx,
    format_export_report,
    read_report,
    verify_onnx_export,
)
from kd_trainer.plan_view import format_plan, plan_report
from kd_trainer.recipe import RecipeError, load_recipe
from kd_trainer.search import (SearchIndexError, build_index, gallery_images, load_encoder, open_searcher,
                                 write_search_page)
from kd_trainer.report import (
    GalleryOptions,
    Latency,
    PlotDependencyError,
    ReportError,
    SkippedRunWarning,
    UnknownMetricWarning,
    write_report,
)
from kd_trainer.runner import main as run_main
from kd_trainer.runner.errors import one_line_errors
from kd_trainer.runner.retrieval import build_model, prepare_data, replay_config

COMMANDS = ("train", "eval", "demo", "terms", "archs", "report", "cache-teacher", "plan", "export-onnx", "index", "search")


PAIRINGS = ("model", "teacher", "hybrid-image", "hybrid-text")


def _context_length(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 2:  # the start and end tokens alone take two places
        raise argparse.ArgumentTypeError(f"expected at least 2 (the start and end tokens), got {value}")
    return value


def _export_folder(text: str) -> str:
    """export-onnx --out: a folder, or a path where one can be made (the export creates it)."""
    try:
        check_output_folder(Path(text))
    except OnnxExportError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _output_file(text: str) -> str:
    """eval --output: a file name whose folder exists or can be made (eval creates it)."""
    if Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder; give the metrics file's name")
    try:
        check_output_folder(Path(text).parent)
    except OnnxExportError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _check_arguments(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """What one option alone cannot say: eval's and export-onnx's options that do not go together.
    A bad combination is a usage error (exit 2) before any model is loaded."""
    if ns.command == "eval":
        if ns.onnx:
            given = [flag for flag, value in (("--teacher", ns.teacher), ("--pairings", ns.pairings),
                                              ("--arch", ns.arch), ("--image-size", ns.image_size),
                                              ("--context-length", ns.context_length),
                                              ("--irra-config", ns.irra_config)) if value]
            if given:
                parser.error(f"--onnx evaluates the exported folder as it is: {', '.join(given)} cannot be used with it")
        elif ns.onnx_variant:
            parser.error("--onnx-variant needs --onnx (MODEL is then a folder written by export-onnx)")
        if not ns.teacher:
            needs = sorted(set(ns.pairings or []) - {"model"})
            given = [flag for flag, value in (("--teacher-arch", ns.teacher_arch),
                                              ("--teacher-config", ns.teacher_config)) if value]
            if needs:
                parser.error(f"the pairings {needs} need --teacher")
            if given:
                parser.error(f"{', '.join(given)} describe a teacher: give it with --teacher")
    elif ns.command == "export-onnx":
        if ns.root is not None and ns.dataset is None:
            parser.error("--root needs --dataset (the split to check retrieval on)")
        if ns.int8_scheme != DEFAULT_INT8_SCHEME and not ns.int8:
            parser.error(f"--int8-scheme {ns.int8_scheme} needs --int8 (it says how the INT8 graphs are made)")
        if ns.int8_scheme in CALIBRATED_INT8_SCHEMES and ns.dataset is None:
            parser.error(f"--int8-scheme {ns.int8_scheme} needs --dataset NAME (and --root DIR): its calibration "
                         f"images and captions are drawn from that dataset's train split")
        try:
            check_limits(tolerance=ns.tolerance, atol=ns.atol)
        except OnnxExportError as e:
            parser.error(str(e))


def _load_any(path: str, arch: str | None, image_size: list[int] | None, context_length: int | None,
              config: str | None) -> object:
    """A kd_trainer folder, or any checkpoint format the importers know (IRRA, TinyCLIP, OpenAI, ...)."""
    return model_from_checkpoint(path, arch=arch, image_size=tuple(image_size) if image_size else None,
                                 context_length=context_length, irra_config=config)


# Data sets of the other tasks: eval ranks text-to-image retrieval, so it refuses these by name.
_NON_RETRIEVAL_DATASETS = {"synthshapes": ("synth_shapes", "classification"),
                           "synthdet": ("synth_det", "detection")}


def _eval_dataset(name: str) -> str:
    """eval --dataset as its canonical retrieval-set name; an unknown name, or a classification or
    detection set, is a DatasetFormatError (one line, exit 2), raised before any model is loaded."""
    other = _NON_RETRIEVAL_DATASETS.get(squash_dataset_name(name))
    if other is not None:
        raise DatasetFormatError(f"--dataset {name!r} is a {other[1]} data set: eval ranks text-to-image "
                                 f"retrieval and needs a retrieval data set, one of {', '.join(DATASETS)}")
    try:
        return canonical_dataset_name(name)
    except ValueError as e:
        raise DatasetFormatError(str(e)) from None


def _refuse_non_retrieval_run(model: str) -> None:
    """MODEL is a run folder (or a file or checkpoint-N folder in one) whose saved recipe.yaml says a task
    other than retrieval: refuse it in one line naming the task and where its test metrics are."""
    path = Path(model)
    start = path if path.is_dir() else path.parent
    # a checkpoint-N folder (or a file in one) belongs to the run folder above it
    for folder in (start, start.parent) if start.name.startswith("checkpoint-") else (start,):
        recipe = folder / "recipe.yaml"
        if not recipe.is_file():
            continue
        try:
            saved = yaml.safe_load(recipe.read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            return  # not a recipe we can read: the loader says what is wrong with the model, if anything
        task = saved.get("task", "retrieval") if isinstance(saved, dict) else "retrieval"
        if isinstance(task, str) and task != "retrieval":
            results = folder / "test_results.json"
            where = f"its test metrics are in {results}, written at the end of its run"
            if not results.is_file():
                where += " (not there yet: the run has not finished)"
            raise CheckpointError(f"{model!r} is a {task} run ({recipe} says task: {task}); eval ranks text-to-image "
                                  f"retrieval models only: {where}")
        return


def _eval(ns: argparse.Namespace) -> None:
    """Evaluate a model (and, with --teacher, the teacher and the hybrid pairings) on one split.

    A hybrid pairing embeds the gallery with one model's image tower and the queries with the
    other's text tower: ``hybrid-image`` = model image x teacher text, ``hybrid-text`` = teacher
    image x model text, the scores a staged run reports for the tower it trains.
    """
    _refuse_non_retrieval_run(ns.model)
    if ns.teacher:
        _refuse_non_retrieval_run(ns.teacher)
    name = _eval_dataset(ns.dataset)  # a bad name is refused before any model is loaded
    model = _load_any(ns.model, ns.arch, ns.image_size, ns.context_length, ns.irra_config)
    # A NaN weight makes every score it touches NaN: refuse before computing, naming the tensors.
    require_finite_weights(model.clip, name=f"the model {ns.model}", refused="evaluated")  # type: ignore[attr-defined]
    teacher = None
    if ns.teacher:
        teacher = _load_any(ns.teacher, ns.teacher_arch, ns.image_size, ns.context_length, ns.teacher_config)
        require_finite_weights(teacher.clip, name=f"the teacher {ns.teacher}",  # type: ignore[attr-defined]
                               refused="evaluated")
    pairings = ns.pairings or (list(PAIRINGS) if teacher is not None else ["model"])
    raw = load_pedes(name, ns.root, splits=[ns.split])
    if f"{ns.split}_gallery" not in raw:
        raise DatasetFormatError(f"{ns.dataset} has no {ns.split!r} split (it has {sorted(raw)})")

    def views(m: object) -> object:  # each tower sees the split at its own image size / caption length
        return with_retrieval_transforms(raw, image_size=m.image_size, augment=False,  # type: ignore[attr-defined]
                                         context_length=m.context_length, dataset_name=name)  # type: ignore[attr-defined]

    data = {"model": views(model), "teacher": views(teacher) if teacher is not None else None}
    towers = {"model": ("model", "model"), "teacher": ("teacher", "teacher"),
              "hybrid-image": ("model", "teacher"), "hybrid-text": ("teacher", "model")}
    models = {"model": model, "teacher": teacher}
    results = {}
    for pairing in pairings:
        image_side, text_side = towers[pairing]
        results[pairing] = evaluate_retrieval(
            models[image_side], data[image_side][f"{ns.split}_gallery"], data[text_side][f"{ns.split}_queries"],
            text_model=models[text_side], batch_size=ns.batch_size, collate_fn=collate_retrieval)
    label = {"model": Path(ns.model).name, "teacher": f"teacher ({Path(ns.teacher or '').name})",
             "hybrid-image": "model image x teacher text", "hybrid-text": "teacher image x model text"}
    print(f"{name}/{ns.split}, text-to-image (%):")
    print(format_metrics({label[p]: results[p] for p in pairings}))
    default_dir = Path(ns.model) if Path(ns.model).is_dir() else Path(ns.model).parent
    out = Path(ns.output) if ns.output else default_dir / f"eval_{name}_{ns.split}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results["model"] if pairings == ["model"] else results, indent=2))
    print(f"wrote {out}")


def _eval_onnx(ns: argparse.Namespace) -> None:
    """Evaluate a folder written by export-onnx: images and captions preprocessed from its
    preprocess.json, run through its graphs, ranked by the same metric code as any model. An unfinished,
    damaged or mixed folder is refused (exit 2) by OnnxDualEncoder; an unverified or failed one is
    evaluated with a warning."""
    variant = ns.onnx_variant or "fp32"
    name = _eval_dataset(ns.dataset)  # a bad name is refused before the graphs are loaded
    try:
        encoder = OnnxDualEncoder(ns.model, variant)
    except DeployDependencyError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    report = read_report(Path(ns.model))
    if report is None:
        print(f"warning: {ns.model} has no export_report.json: these graphs were never checked against the "
              "model (kd-trainer export-onnx checks them)", file=sys.stderr)
    elif not report.get("passed"):
        print(f"warning: {ns.model}'s export_report.json says the check against the model FAILED: "
              f"{'; '.join(report.get('failures') or ['(no reason recorded)'])}", file=sys.stderr)
    raw = load_pedes(name, ns.root, splits=[ns.split])
    if f"{ns.split}_gallery" not in raw:
        raise DatasetFormatError(f"{ns.dataset} has no {ns.split!r} split (it has {sorted(raw)})")
    metrics = evaluate_onnx(encoder, raw[f"{ns.split}_gallery"], raw[f"{ns.split}_queries"], dataset_name=name,
                            batch_size=ns.batch_size)
    print(f"{name}/{ns.split}, text-to-image (%):")
    print(format_metrics({f"{Path(ns.model).name} (ONNX {variant})": metrics}))
    out = Path(ns.output) if ns.output else Path(ns.model) / f"eval_{name}_{ns.split}_{variant}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(metrics, indent=2))
    print(f"wrote {out}")


def _export_onnx(ns: argparse.Namespace) -> None:
    """ONNX graphs of a model, checked against it (on a dataset split when one is given); the results
    go to export_report.json and, for a run folder, to its model card. A failed check exits 1 (the
    graphs and the report stay, for a look); bad input exits 2 and writes nothing."""
    model = _load_any(ns.model, ns.arch, None, ns.context_length, ns.irra_config)
    try:
        root = (ns.root or "./data") if ns.dataset else None
        scheme = ns.int8_scheme
        if ns.int8 and scheme in CALIBRATED_INT8_SCHEMES:
            scheme = calibrated_int8(*calibration_sample(ns.dataset, root, n=ns.calibration_samples))
        export_onnx(model, ns.out, int8=ns.int8, fp16=ns.fp16, image_size=ns.image_size, int8_scheme=scheme)
        report = verify_onnx_export(ns.out, model, dataset=ns.dataset, root=root, split=ns.split,
                                    tolerance=ns.tolerance, atol=ns.atol, batch_size=ns.batch_size)
    except DeployDependencyError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except ExportVerificationError as e:
        print(format_export_report(e.report))
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    print(format_export_report(report))
    print(f"wrote {Path(ns.out) / 'export_report.json'}")
    card = Path(ns.model) / "README.md"
    if card.is_file():
        print(f"added the export to the model card {update_model_card(card, report, ns.out)}")
    else:
        print(f"no model card ({card}) to add the export to; the results are in export_report.json")


def _cache_teacher(ns: argparse.Namespace) -> None:
    """One teacher pass over the recipe's training set: the cache `teacher.cache` then points to."""
    recipe = load_recipe(ns.recipe, ns.overrides)
    if recipe.task != "retrieval":
        raise RecipeError(f"{ns.recipe} is a {recipe.task} recipe; cache-teacher caches the embeddings of a "
                          "retrieval recipe's `teacher:`")
    if recipe.teacher is None:
        raise RecipeError(f"{ns.recipe} has no `teacher:`; there is nothing to cache")
    # Its data, teacher and draws as the run resolves them (its TrainingArguments are not used here,
    # so they are built as for `kd-trainer plan`, on any machine).
    run = resolve_run(recipe, describe_only=True)
    out = ns.out or run.teacher.model.cache.path
    if not out:
        raise RecipeError("say where the cache goes: --out DIR, or teacher.cache in the recipe")
    data = prepare_data(run)
    teacher = build_model(run.teacher.model, run)
    cfg = replay_config(run)
    path = build_teacher_cache(teacher, data.raw_train, out, image_size=cfg.image_size, augment=cfg.augment,
                               context_length=cfg.context_length, num_draws=cfg.num_draws, seed=cfg.seed,
                               batch_size=ns.batch_size, dataset_name=run.data.name,
                               progress=True, num_workers=ns.num_workers, precision=ns.precision)
    print(f"wrote the teacher cache to {path}; train from it with teacher.cache={path}")


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _report(ns: argparse.Namespace) -> None:
    """Table to stdout, files under --out; skipped runs as warnings, bad input as exit 2 (no traceback)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SkippedRunWarning)
        warnings.simplefilter("always", UnknownMetricWarning)
        try:
            latency = Latency(warmup=min(3, ns.latency_iters), iters=ns.latency_iters) if ns.latency_iters else None
            galleries = None if ns.no_galleries else GalleryOptions(
                queries=ns.gallery_queries, k=ns.top_k, seed=ns.gallery_seed, data_root=ns.data_root)
            written = write_report(ns.runs, ns.out, with_minp=ns.minp, duplicates=ns.duplicates, seeds=ns.seeds,
                                   plots=not ns.no_plots, weighted=ns.weighted, html=not ns.no_html,
                                   cost=not ns.no_cost, latency=latency, galleries=galleries)
        except (ReportError, PlotDependencyError, ValueError) as e:
            error: BaseException | None = e
        else:
            error = None
    for w in caught:
        if issubclass(w.category, (SkippedRunWarning, UnknownMetricWarning)):
            print(f"warning: {w.message}", file=sys.stderr)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if error is not None:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2)
    print(written["table"])
    print(f"wrote {written['results']}")
    if written["html"] is not None:
        print(f"wrote {written['html']}")
    for path in written["plots"].values():
        print(f"wrote {path}")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _index(ns: argparse.Namespace) -> None:
    """Embed every image of a folder once with a model; the index records the files and the model."""
    try:
        gallery_images(ns.gallery)  # a missing, empty or one-file gallery: said before a model is loaded
        encoder = load_encoder(ns.model, onnx_variant=ns.onnx_variant)
        index = build_index(encoder, ns.gallery, ns.out, batch_size=ns.batch_size)
    except (SearchIndexError, DeployDependencyError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    m = index.model
    print(f"indexed {len(index.files)} images of {index.gallery} with {m['path']} "
          f"({m['kind']}{' ' + m['variant'] if m['variant'] else ''}, {m['embed_dim']}-d)")
    print(f"wrote {index.path}")


def _search(ns: argparse.Namespace) -> None:
    """Rank an index's images for each query; a stale or foreign index is refused (exit 2)."""
    try:
        searcher = open_searcher(ns.index, model=ns.model, onnx_variant=ns.onnx_variant, gallery=ns.gallery)
        hits = searcher.search(ns.queries, top=ns.top)
    except (SearchIndexError, DeployDependencyError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    for query, row in zip(ns.queries, hits):
        print(f"query: {query}")
        for h in row:
            print(f"{h.rank:4d}  {h.score:.4f}  {h.file}")
    if ns.html:
        page = write_search_page(ns.html, ns.queries, hits, index_path=str(searcher.index.path),
                                 model=str(searcher.encoder.describe()["path"]), gallery=str(searcher.gallery))
        print(f"wrote {page}")


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
    p = sub.add_parser("eval", help="evaluate a model (and hybrid pairings with a teacher) on a dataset split")
    p.add_argument("model", help="a kd_trainer output folder, or any checkpoint (IRRA best.pth, TinyCLIP/OpenAI/"
                                 "open_clip weights, a HF CLIPModel or open_clip folder)")
    p.add_argument("--dataset", required=True)
    p.add_argument("--root", default="./data")
    p.add_argument("--split", default="test", choices=["val", "test"])
    p.add_argument("--arch", help="architecture of a bare state dict (see `kd-trainer archs`)")
    p.add_argument("--image-size", type=_positive_int, nargs=2, metavar=("H", "W"), help="evaluate at this size")
    p.add_argument("--context-length", type=_context_length)
    p.add_argument("--irra-config", help="IRRA's configs.yaml (default: next to the checkpoint)")
    p.add_argument("--teacher", help="a teacher, in any of the model's formats: adds teacher and hybrid pairings")
    p.add_argument("--teacher-arch")
    p.add_argument("--teacher-config", help="the teacher's IRRA configs.yaml")
    p.add_argument("--pairings", nargs="+", choices=PAIRINGS,
                   help="what to evaluate (default: model; with --teacher, all four)")
    p.add_argument("--batch-size", type=_positive_int, default=256)
    p.add_argument("--output", type=_output_file,
                   help="metrics JSON (default: eval_<dataset>_<split>.json beside the model; its folder is created)")
    p.add_argument("--onnx", action="store_true", help="MODEL is a folder written by export-onnx")
    p.add_argument("--onnx-variant", choices=VARIANTS, help="which graphs of --onnx (default fp32)")
    p = sub.add_parser("demo", help="SynthPEDES demo: teacher, student without KD, student with KD")
    p.add_argument("--root", default="./data")
    p.add_argument("--runs", default="./runs/demo")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides applied to every recipe of the demo")
    p.add_argument("--seeds", type=int, default=1, choices=range(1, len(DEMO_SEEDS) + 1), metavar="N",
                   help=f"train both students at N seeds (1 to {len(DEMO_SEEDS)}: 42, 1, 2, ...) and add their "
                        "mean ± std")
    p.add_argument("--teacher-only", action="store_true",
                   help="only pre-train and fine-tune the teacher (what make compare needs), unless already done")
    p = sub.add_parser("cache-teacher", help="embed the training set with the recipe's teacher once (K draws)")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--out", help="cache folder (default: the recipe's teacher.cache)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: fp32 on CPU, bf16 autocast on GPU (embeddings are stored in fp32 either way)")
    p = sub.add_parser("export-onnx", help="ONNX graphs of a model (+ INT8/FP16), checked against it on a split")
    p.add_argument("model", metavar="RUN_OR_CHECKPOINT", help="a run folder or any checkpoint `eval` reads")
    p.add_argument("--out", required=True, type=_export_folder,
                   help="folder for the graphs, preprocess.json and export_report.json (created; other files in "
                        "it are left alone)")
    p.add_argument("--int8", action="store_true", help="also INT8 graphs, quantised by --int8-scheme")
    p.add_argument("--int8-scheme", default=DEFAULT_INT8_SCHEME, choices=INT8_SCHEME_NAMES,
                   help="dynamic (default): int8 weights and activations, the fastest on CPU; weight-only: 8-bit "
                        "weight blocks, float activations, closer to the fp32 ranking but slower than fp32 on CPU; "
                        "calibrated: weight-only blocks chosen by GPTQ on --dataset's train split, the MatMuls that "
                        "move the ranking most kept in float32, the closest to the fp32 ranking (for search "
                        "indexes; docs/results.md, 'Which INT8')")
    p.add_argument("--calibration-samples", type=_positive_int, default=256,
                   help="with --int8-scheme calibrated: train images and captions drawn (seed 0; default 256)")
    p.add_argument("--fp16", action="store_true", help="also half-precision graphs (GPU/NPU runtimes)")
    p.add_argument("--image-size", type=_positive_int, nargs=2, metavar=("H", "W"),
                   help="export at this input size (default: the model's; the check compares with the model's)")
    p.add_argument("--dataset", help="check retrieval on this dataset's split: fail on a drop beyond --tolerance")
    p.add_argument("--root", help="the dataset's root folder (default ./data)")
    p.add_argument("--split", default="test", choices=["val", "test"])
    p.add_argument("--tolerance", type=float, default=0.5, help="largest R@1 / mAP drop allowed, in points")
    p.add_argument("--atol", type=float, default=1e-4, help="largest fp32 embedding difference allowed")
    p.add_argument("--arch", help="architecture of a bare state dict (see `kd-trainer archs`)")
    p.add_argument("--context-length", type=_context_length)
    p.add_argument("--irra-config", "--teacher-config", dest="irra_config",
                   help="IRRA's configs.yaml of the checkpoint (default: next to it)")
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p = sub.add_parser("plan", help="print the resolved run of a recipe, without training: its data, models and "
                                    "checkpoints, mimic jobs, and per stage the groups, LR and alpha per epoch, "
                                    "terms, precision and kept checkpoint (what resolved_run.json records)")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--json", action="store_true",
                   help="print it as JSON: ResolvedRun.describe(), with each retrieval stage's tensors and "
                        "optimiser groups bound to the student")
    sub.add_parser("terms", help="list the registered loss terms")
    sub.add_parser("archs", help="list the named architectures")
    p = sub.add_parser("report", help="results table (methods x datasets) and loss-curve plots of finished runs")
    p.add_argument("runs", nargs="+", metavar="RUN_OR_DIR",
                   help="run folders, or folders searched recursively for them")
    p.add_argument("--out", default="reports", help="folder for results.md and <run>_losses.png (default: reports)")
    p.add_argument("--minp", action="store_true", help="append mINP to each retrieval cell (detection tables have no mINP)")
    p.add_argument("--duplicates", choices=["error", "split"], default="error",
                   help="two runs with one method label on one dataset that are not seeds of one configuration: "
                        "stop (default) or give each its own row (seeds of one configuration are averaged)")
    p.add_argument("--seeds", choices=["mean", "split"], default="mean",
                   help="seeds of one configuration: one mean ± std (n) cell (default) or a row per run")
    p.add_argument("--weighted", action="store_true", help="plot the weighted loss terms")
    p.add_argument("--no-plots", action="store_true", help="no loss-curve plots (no matplotlib needed)")
    p.add_argument("--no-html", action="store_true", help="no index.html (and so no galleries)")
    p.add_argument("--no-cost", action="store_true",
                   help="no parameter / GFLOPs / latency columns (the models are not loaded for them)")
    p.add_argument("--latency-iters", type=_non_negative, default=20,
                   help="CPU latency: median of this many batch-1 calls per tower (default 20); 0: not measured")
    p.add_argument("--no-galleries", action="store_true", help="index.html without retrieval galleries")
    p.add_argument("--gallery-queries", type=int, default=8, help="test captions per gallery (default 8)")
    p.add_argument("--top-k", type=int, default=5, help="gallery images shown per caption (default 5)")
    p.add_argument("--gallery-seed", type=int, default=0, help="seed of the caption sample (default 0)")
    p.add_argument("--data-root", help="the datasets' folder for the galleries (default: each recipe's data.root)")
    p = sub.add_parser("index", help="embed a folder of images once, for `kd-trainer search`")
    p.add_argument("model", metavar="MODEL", help="a run folder, an open_clip export, any checkpoint `eval` reads, "
                                                  "or an ONNX export (a folder written by export-onnx)")
    p.add_argument("--gallery", required=True, metavar="DIR", help="the folder of images (sub-folders included)")
    p.add_argument("--out", required=True, metavar="INDEX", help="the index folder to write")
    p.add_argument("--onnx-variant", choices=VARIANTS, help="which graphs of an ONNX export (default fp32)")
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p = sub.add_parser("search", help="rank an index's images for a sentence (the model that built it embeds it)")
    p.add_argument("index", metavar="INDEX", help="a folder written by `kd-trainer index`")
    p.add_argument("queries", nargs="+", metavar="QUERY", help="one or more sentences")
    p.add_argument("--top", type=_positive_int, default=10, help="images per query (default 10)")
    p.add_argument("--html", metavar="OUT", help="also write a self-contained page with the images")
    p.add_argument("--model", help="the model, if it moved since the index was built (it must be the same model)")
    p.add_argument("--onnx-variant", choices=VARIANTS, help="with --model: which graphs of an ONNX export "
                                                             "(default: the index's)")
    p.add_argument("--gallery", metavar="DIR", help="the gallery folder, if it moved since the index was built")
    ns = parser.parse_args(argv)
    _check_arguments(ns, sub.choices[ns.command])
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        with one_line_errors():  # a bad recipe, dataset or checkpoint, or a known fault: one line, exit 2
            _dispatch(ns)
    except BrokenPipeError:  # `kd-trainer plan ... | head`: the reader left; no traceback for that
        sys.stdout = open(os.devnull, "w")  # the interpreter flushes stdout at exit: let it flush nothing
        sys.exit(141)  # as a shell reports a process ended by SIGPIPE


def _dispatch(ns: argparse.Namespace) -> None:
    if ns.command == "train":
        run_main([ns.recipe, *ns.overrides])
    elif ns.command == "eval":
        _eval_onnx(ns) if ns.onnx else _eval(ns)
    elif ns.command == "export-onnx":
        _export_onnx(ns)
    elif ns.command == "plan":
        report = plan_report(load_recipe(ns.recipe, ns.overrides))
        print(json.dumps(report, indent=2) if ns.json else format_plan(report))
    elif ns.command == "demo":
        if ns.teacher_only:
            train_teacher(root=ns.root, runs=ns.runs, overrides=ns.overrides)
        else:
            run_demo(root=ns.root, runs=ns.runs, overrides=ns.overrides, seeds=ns.seeds)
    elif ns.command == "report":
        _report(ns)
    elif ns.command == "cache-teacher":
        _cache_teacher(ns)
    elif ns.command == "index":
        _index(ns)
    elif ns.command == "search":
        _search(ns)
    elif ns.command == "terms":
        for name, spec in sorted(TERMS.items()):
            print(f"{name:18s} {spec.kind:8s} sides={','.join(spec.sides):16s} "
                  f"T={spec.default_temperature:<5} teacher={'yes' if spec.needs_teacher else 'no'}")
    elif ns.command == "archs":
        for name in list_architectures():
            a = get_architecture(name)
            v, t = a["vision_cfg"], a["text_cfg"]
            print(f"{name:16s} embed={a['embed_dim']:<4} image={a.get('image_size')} "
                  f"vision={v['layers']}x{v['width']}/p{v['patch_size']} text={t['layers']}x{t['width']}")


if __name__ == "__main__":
    main()
