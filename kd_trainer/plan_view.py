"""``kd-trainer plan RECIPE``: what each stage of a recipe will do, without training.

Users read it to check a recipe against a paper: per stage, which towers train and which
parameter groups the optimiser gets (each with its LR and weight decay), the LR and alpha at
every epoch, every term with its side, temperature and group, the precision of the weights, and
which checkpoint the run keeps. Models are built on the ``meta`` device (no weights, no memory),
so the real ViT-B/16 plan prints in a second.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from transformers import TrainingArguments

from kd_trainer.distill.frozen_tower import format_frozen_tower, frozen_tower_plan, optimised_params
from kd_trainer.distill.optim import describe_groups, lr_per_epoch, param_groups
from kd_trainer.distill.plan import Stage
from kd_trainer.distill.resolved import resolve_run
from kd_trainer.models.factory import create_model
from kd_trainer.models.inherit import plan_inheritance
from kd_trainer.models.precision import convert_to_original_fp16
from kd_trainer.recipe import Recipe
from kd_trainer.recipe.schedules import Clock, ScheduleLike, uses_epochs, value_at


def _meta_model(arch: Any, recipe: Recipe, projection_dim: int | None = None) -> Any:
    with torch.device("meta"):
        return create_model(arch, image_size=tuple(recipe.data.image_size), context_length=recipe.data.context_length,
                            projection_dim=projection_dim)


def _per_epoch(schedule: ScheduleLike | None, epochs: int) -> list[float] | None:
    """A weight or alpha at every epoch of a stage (None when it moves within epochs, by steps)."""
    if schedule is None:
        return None
    if not isinstance(schedule, (int, float)) and not uses_epochs(schedule):
        return None
    return [value_at(schedule, Clock(epoch=e, stage_epoch=e)) for e in range(epochs)]


def _run_epochs(args: TrainingArguments) -> int | None:
    """A single-stage run's length in whole epochs (``num_train_epochs``), or None when ``max_steps``
    sets it or the count is fractional."""
    if args.max_steps > 0:
        return None
    epochs = float(args.num_train_epochs)
    return int(epochs) if epochs.is_integer() else None


def _name(value: Any) -> str:
    """An enum field of ``TrainingArguments`` (optim, lr_scheduler_type) as the string a recipe gives."""
    return str(getattr(value, "value", value))


def _stage_optimiser(stage: Stage, student: torch.nn.Module, args: TrainingArguments, epochs: int) -> dict[str, Any]:
    named = optimised_params(stage, student.named_parameters())
    if stage.optim is None:
        return {"preset": "trainer", "optim": _name(args.optim), "lr": stage.learning_rate or args.learning_rate,
                "weight_decay": args.weight_decay, "schedule": _name(args.lr_scheduler_type), "tensors": len(named)}
    o = stage.optim
    groups = param_groups(named, lr=o.lr, weight_decay=o.weight_decay, bias_lr_factor=o.bias_lr_factor,
                          head_lr_factor=o.head_lr_factor, head_keywords=o.head_keywords,
                          bias_weight_decay=o.bias_weight_decay, heads_before_bias=o.heads_before_bias)
    return {"preset": "original", "type": o.type, "betas": list(o.betas), "eps": o.eps,
            "groups": [{k: g[k] for k in ("kind", "tensors", "elements", "lr", "weight_decay")}
                       for g in describe_groups(groups)],
            "lr_per_epoch": lr_per_epoch(o, epochs) if epochs else None,
            "schedule": f"{o.warmup_epochs} warm-up epochs from x{o.warmup_factor}, then {o.schedule}, "
                        f"stepped per {o.step_unit}"}


def plan_report(recipe: Recipe) -> dict[str, Any]:
    """The plan of a recipe as plain data (what ``kd-trainer plan`` prints)."""
    if recipe.task != "retrieval":
        return _task_plan_report(recipe)
    # What the run would decide; the report reads it, never the raw recipe keys.
    run = resolve_run(recipe, describe_only=True)
    plan, args = run.plan, run.args
    student = _meta_model(recipe.student.architecture(), recipe, projection_dim=run.projection_dim)
    plan.bind(student)
    inheritance = None
    inherit = recipe.student.inherit
    if inherit is not None and inherit.source == "teacher" and recipe.teacher is not None:
        source = _meta_model(recipe.teacher.architecture(), recipe)
        inheritance = plan_inheritance(student, source, layers=inherit.layers).summary()
    elif inherit is not None:
        inheritance = f"from {inherit.source}, layers {inherit.layers} (the map is printed when the run loads it)"
    precision: dict[str, Any] = {"mode": recipe.precision or "fp32 weights",
                                 "mixed": "bf16" if args.bf16 else "fp16" if args.fp16 else None}
    if recipe.precision == "original":
        report = convert_to_original_fp16(student)
        precision["student_fp16_tensors"] = len(report.converted)
        precision["student_fp32_tensors"] = len(report.kept)
    run_epochs = _run_epochs(args) if recipe.stages is None else None
    stages = []
    for s in plan.stages:
        epochs = s.epochs or run_epochs or 0
        stages.append({
            "name": s.name, "epochs": epochs or None, "steps": s.steps, "trains": s.trainable,
            "trainable_tensors": len(s.params), "no_autograd_towers": list(s.frozen_towers),
            "terms": [{"key": t.key, "side": t.config.side, "temperature": t.temperature, "group": t.group,
                       "weight": t.config.weight if isinstance(t.config.weight, (int, float))
                       else t.config.weight.model_dump(), "kwargs": t.config.kwargs} for t in s.terms],
            "alpha_per_epoch": _per_epoch(s.alpha, epochs) if epochs else None,
            "optimiser": _stage_optimiser(s, student, args, epochs),
            "frozen_tower": frozen_tower_plan(plan.stages, s.index, student),
            "eval_hybrids": s.eval_hybrids,
        })
    kept = "the last weights of the last stage"
    if plan.select is not None:
        kept = (f"the epoch of the last stage with the best {plan.select.metric} on {plan.select.split}"
                + (" (test-set selection, as the original)" if plan.select.split == "test" else ""))
    summary = {"accumulation": f"{recipe.contrastive_accumulation}, {run.micro_batches} micro-batch(es) per step",
           "nonfinite_skips": recipe.nonfinite_skips,
           "data_checks": {"verify_images": recipe.data.verify_images, "skip_unreadable": recipe.data.skip_unreadable,
                           "duplicates": recipe.data.duplicates}}
    return {"recipe": recipe.name, "method": recipe.method, "precision": precision, "run": summary, "stages": stages,
            "inheritance": inheritance, "checkpoint_kept": kept, "resolved": run.describe()}


def format_plan(report: dict[str, Any]) -> str:
    """The report as the lines ``kd-trainer plan`` prints."""
    if report.get("task", "retrieval") != "retrieval":
        return _format_task_plan(report)
    lines = [f"plan of {report['recipe']}" + (f" ({report['method']})" if report["method"] else "")]
    p = report["precision"]
    lines.append(f"precision: {p['mode']}" + (f", mixed {p['mixed']}" if p["mixed"] else "")
                 + (f" ({p['student_fp16_tensors']} student tensors fp16, {p['student_fp32_tensors']} fp32)"
                    if "student_fp16_tensors" in p else ""))
    r = report["run"]
    lines.append(f"accumulation: {r['accumulation']}; non-finite losses skipped before stopping: "
                 f"{r['nonfinite_skips']}; data checks: {r['data_checks']}")
    d = report["resolved"]
    t = d["teacher"]
    lines.append(f"output folder: {d['output_dir']}; evaluated during training: {d['eval_split'] or 'nothing'}; "
                 f"test split: {d['test_split'] or 'none'}; resume: {d['resume'] or 'no'}"
                 + (f"; hub: {d['hub']['repo_id']}" + (" (pushed at the end)" if d["hub"]["push"] else "")
                    if d["hub"] else ""))
    lines.append(f"teacher: {'loaded' if t['load'] else 'not loaded'}"
                 + (", beside the student in training" if t["in_training"] else ", for its weights only" if t["load"]
                    else "") + (f", cache {t['cache']}" if t["cache"] else "")
                 + (f"; student projection to width {d['projection_dim']}" if d["projection_dim"] else ""))
    if report["inheritance"]:
        lines.append("student inherited from its source:\n  " + report["inheritance"].replace("\n", "\n  "))
    for i, s in enumerate(report["stages"], 1):
        length = f"{s['epochs']} epochs" if s["epochs"] else (f"{s['steps']} steps" if s["steps"] else "the run")
        lines.append(f"\nstage {i}/{len(report['stages'])} {s['name']!r}: {length}; trains {s['trains']} "
                     f"({s['trainable_tensors']} tensors)"
                     + (f"; no autograd in {', '.join(s['no_autograd_towers'])}" if s["no_autograd_towers"] else ""))
        for t in s["terms"]:
            lines.append(f"  term {t['key']:<20} side {t['side']:<5} T {t['temperature']:<6g} group {t['group']:<8}"
                         f" weight {t['weight']}" + (f" {t['kwargs']}" if t["kwargs"] else ""))
        o = s["optimiser"]
        if o["preset"] == "trainer":
            lines.append(f"  optimiser: Trainer {o['optim']}, lr {o['lr']:g}, weight decay {o['weight_decay']:g}, "
                         f"{o['schedule']} schedule over the stage")
        else:
            lines.append(f"  optimiser: {o['type']} betas {o['betas']} eps {o['eps']:g}; {o['schedule']}")
            for g in o["groups"]:
                lines.append(f"    group {g['kind']:<9} {g['tensors']:>4} tensors {g['elements']:>10,} elements  "
                             f"lr {g['lr']:.3g}  weight decay {g['weight_decay']:g}")
            if o["lr_per_epoch"]:
                lines.append("  base lr per epoch: " + " ".join(f"{v:.3g}" for v in o["lr_per_epoch"]))
        if s["frozen_tower"]:
            lines.append("  " + format_frozen_tower(s["frozen_tower"]))
        if s["alpha_per_epoch"]:
            lines.append("  alpha per epoch: " + " ".join(f"{v:g}" for v in s["alpha_per_epoch"]))
        if s["eval_hybrids"]:
            lines.append(f"  hybrid evaluation: {', '.join(s['eval_hybrids'])}")
        lines.append(f"  teacher source: {d['teacher_source'][s['name']]}")
    lines.append(f"\ncheckpoint kept: {report['checkpoint_kept']}")
    return "\n".join(lines)


# --- classification and detection: a task loss plus mimic jobs ---------------------------------

def _arch(cfg: Any) -> str:
    """A model's architecture in one line: its name, or the architecture dict as JSON."""
    return cfg.arch if isinstance(cfg.arch, str) else json.dumps(cfg.arch, sort_keys=True)


def _task_plan_report(recipe: Recipe) -> dict[str, Any]:
    """The plan of a classification or detection recipe: its models, its mimic jobs and its one
    stage (the Trainer's own optimiser and schedule over ``training:``). Builds no model and reads
    no data; a tap name that does not exist is found when the run builds the models."""
    run, mimic = resolve_run(recipe, describe_only=True), recipe.mimic
    args = run.args  # TrainingArguments with their own defaults, never copies of them
    jobs = [{"name": j.name, "student": list(j.student), "teachers": {t: list(taps) for t, taps in j.teachers.items()},
             "loss": j.loss.type, "loss_kwargs": j.loss.kwargs, "weight": j.loss_weight,
             "warm_up_iters": j.warm_up_iters, "reduce": j.reduce, "adapter": j.adapter}
            for j in (mimic.jobs if mimic is not None else [])]
    return {
        "recipe": recipe.name, "method": recipe.method, "task": recipe.task,
        "student": {"arch": _arch(recipe.student), "checkpoint": recipe.student.checkpoint},
        "teachers": {name: {"arch": _arch(cfg), "checkpoint": cfg.checkpoint}
                     for name, cfg in (recipe.teachers or {}).items()},
        "task_loss": mimic.task_loss if mimic is not None else True,
        "mimic_jobs": jobs,
        "length": f"{args.max_steps} steps" if args.max_steps > 0 else f"{args.num_train_epochs:g} epochs",
        "optimiser": {"optim": _name(args.optim), "lr": args.learning_rate, "weight_decay": args.weight_decay,
                      "schedule": _name(args.lr_scheduler_type)},
        "run": {"accumulation": f"{run.micro_batches} micro-batch(es) per step", "nonfinite_skips": run.nonfinite_skips},
        "checkpoint_kept": "the last weights",
    }


def _format_task_plan(report: dict[str, Any]) -> str:
    lines = [f"plan of {report['recipe']}" + (f" ({report['method']})" if report["method"] else "")
             + f": task {report['task']}"]
    s = report["student"]
    lines.append(f"student: {s['arch']}" + (f" from {s['checkpoint']}" if s["checkpoint"] else ""))
    for name, t in report["teachers"].items():
        lines.append(f"teacher {name}: {t['arch']}" + (f" from {t['checkpoint']}" if t["checkpoint"] else
                                                       " (no checkpoint: random weights)"))
    r, o = report["run"], report["optimiser"]
    lines.append(f"accumulation: {r['accumulation']}; non-finite losses skipped before stopping: "
                 f"{r['nonfinite_skips']}")
    lines.append(f"\none stage: {report['length']}; task loss: {'yes' if report['task_loss'] else 'no (mimic only)'}")
    lines.append(f"  optimiser: Trainer {o['optim']}, lr {o['lr']:g}, weight decay {o['weight_decay']:g}, "
                 f"{o['schedule']} schedule")
    for j in report["mimic_jobs"]:
        warm = f", warm-up {j['warm_up_iters']} steps" if j["warm_up_iters"] > 0 else ""
        lines.append(f"  mimic job {j['name']}: loss {j['loss']}" + (f" {j['loss_kwargs']}" if j["loss_kwargs"] else "")
                     + f" x {j['weight']:g}{warm}; teachers combined by {j['reduce']}; adapter {j['adapter']}")
        for teacher, taps in j["teachers"].items():
            for student_tap, teacher_tap in zip(j["student"], taps):
                lines.append(f"    student {student_tap} <- {teacher} {teacher_tap}")
    lines.append(f"\ncheckpoint kept: {report['checkpoint_kept']}")
    return "\n".join(lines)
