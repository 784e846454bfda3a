"""``kd-trainer plan RECIPE``: the resolved run of a recipe (what the run will decide), without training.

It prints :meth:`~kd_trainer.distill.resolved.ResolvedRun.describe` for every task: the data set
and its generator, the student and the named teachers with their checkpoints, the mimic jobs,
whether the task loss is kept, the training arguments and the output folder. Users read it to
check a recipe against a paper: per stage, which towers train and which parameter groups the
optimiser gets (each with its LR and weight decay), the LR and alpha at every epoch, every term
with its side, temperature and group, the precision of the weights, and which checkpoint the run
keeps. Models are built on the ``meta`` device (no weights, no memory),
so the real ViT-B/16 plan prints in a second.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import TrainingArguments

from kd_trainer.distill.frozen_tower import format_frozen_tower, frozen_tower_plan, optimised_params
from kd_trainer.distill.optim import describe_groups, lr_per_epoch, param_groups
from kd_trainer.distill.plan import Stage
from kd_trainer.distill.resolved import ModelSpec, ResolvedRun, arg_name, resolve_run
from kd_trainer.models.factory import create_model
from kd_trainer.models.inherit import plan_inheritance
from kd_trainer.models.precision import convert_to_irra_fp16
from kd_trainer.recipe import Recipe
from kd_trainer.recipe.schedules import Clock, ScheduleLike, uses_epochs, value_at


def _meta_model(spec: ModelSpec, run: ResolvedRun, projection_dim: int | None = None) -> Any:
    with torch.device("meta"):
        return create_model(spec.arch, image_size=tuple(run.data.image_size), context_length=run.data.context_length,
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


def _stage_optimiser(stage: Stage, student: torch.nn.Module, args: TrainingArguments, epochs: int) -> dict[str, Any]:
    named = optimised_params(stage, student.named_parameters())
    if stage.optim is None:
        return {"preset": "trainer", "optim": arg_name(args.optim), "lr": stage.learning_rate or args.learning_rate,
                "weight_decay": args.weight_decay, "schedule": arg_name(args.lr_scheduler_type), "tensors": len(named)}
    o = stage.optim
    groups = param_groups(named, lr=o.lr, weight_decay=o.weight_decay, bias_lr_factor=o.bias_lr_factor,
                          head_lr_factor=o.head_lr_factor, head_keywords=o.head_keywords,
                          bias_weight_decay=o.bias_weight_decay, heads_before_bias=o.heads_before_bias)
    return {"preset": "irra", "type": o.type, "betas": list(o.betas), "eps": o.eps,
            "groups": [{k: g[k] for k in ("kind", "tensors", "elements", "lr", "weight_decay")}
                       for g in describe_groups(groups)],
            "lr_per_epoch": lr_per_epoch(o, epochs) if epochs else None,
            "schedule": f"{o.warmup_epochs} warm-up epochs from x{o.warmup_factor}, then {o.schedule}, "
                        f"stepped per {o.step_unit}"}


def plan_report(recipe: Recipe) -> dict[str, Any]:
    """What ``kd-trainer plan`` prints, as plain data: the resolved run (:meth:`ResolvedRun.describe`),
    and for a retrieval run each stage bound to a student built on the meta device (its trainable
    tensors, optimiser groups, LR and alpha per epoch) and an inherited student's layer map. Read
    from the resolved run only, never from the raw recipe keys."""
    run = resolve_run(recipe, describe_only=True)
    report = run.describe()
    if run.plan is None:
        return report  # classification and detection: the resolved run is the whole plan
    plan, args = run.plan, run.args
    student = _meta_model(run.student, run, projection_dim=run.projection_dim)
    plan.bind(student)
    inheritance = None
    inherit = run.student.inherit
    if inherit is not None and inherit["source"] == "teacher" and run.teacher.model is not None:
        source = _meta_model(run.teacher.model, run)
        inheritance = plan_inheritance(student, source, layers=inherit["layers"]).summary()
    elif inherit is not None:
        inheritance = f"from {inherit['source']}, layers {inherit['layers']} (the map is printed when the run loads it)"
    if run.precision is not None:  # its one mode, irra_fp16: IRRA's fp16 weights
        converted = convert_to_irra_fp16(student)
        report["precision"].update(student_fp16_tensors=len(converted.converted),
                                   student_fp32_tensors=len(converted.kept))
    run_epochs = _run_epochs(args)
    for s, described in zip(plan.stages, report["stages"]):
        epochs = s.epochs or (run_epochs if s.steps is None else None) or 0
        described.update({
            "epochs": epochs or None, "trainable_tensors": len(s.params), "no_autograd_towers": list(s.frozen_towers),
            "alpha_per_epoch": _per_epoch(s.alpha, epochs) if epochs else None,
            "optimiser": _stage_optimiser(s, student, args, epochs),
            "frozen_tower": frozen_tower_plan(plan.stages, s.index, student),
        })
    report["inheritance"] = inheritance
    return report


def format_plan(report: dict[str, Any]) -> str:
    """The report as the lines ``kd-trainer plan`` prints."""
    if report["task"] != "retrieval":
        return _format_task_plan(report)
    d = report
    lines = [_title(report), _data_line(report["data"]), _model_line("student", report["student"])]
    p = report["precision"]
    lines.append(f"precision: {p['mode']}" + (f", mixed {p['mixed']}" if p["mixed"] else "")
                 + (f" ({p['student_fp16_tensors']} student tensors fp16, {p['student_fp32_tensors']} fp32)"
                    if "student_fp16_tensors" in p else ""))
    lines.append(_run_line(report) + f"; data checks: {report['data']['checks']}")
    t = d["teacher"]
    lines.append(f"evaluated during training: {d['eval_split'] or 'nothing'}; test split: {d['test_split'] or 'none'}")
    lines.append(f"teacher: {'loaded' if t['load'] else 'not loaded'}"
                 + (", beside the student in training" if t["in_training"] else ", for its weights only" if t["load"]
                    else "") + (f", cache {t['cache']}" if t["cache"] else "")
                 + (f"; student projection to width {d['projection_dim']}" if d["projection_dim"] else ""))
    if t["model"] is not None:
        lines.append(_model_line("teacher model", t["model"]))
    lines.extend(_model_line(f"teacher {name}", m) for name, m in report["teachers"].items())
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
        lines.append(f"  teacher source: {s['teacher_source']}")
    lines.extend(_job_lines(report["mimic_jobs"], indent=""))
    lines.append(f"\ncheckpoint kept: {report['checkpoint_kept']}")
    return "\n".join(lines)


# --- the lines every task shares, and the classification and detection plan ----------------------

def _title(report: dict[str, Any]) -> str:
    return (f"plan of {report['name']}" + (f" ({report['method']})" if report["method"] else "")
            + f": task {report['task']}, seed {report['seed']}")


def _arch(arch: Any) -> str:
    """A model's architecture in one line: its name, or the architecture dict as JSON."""
    return arch if isinstance(arch, str) else json.dumps(arch, sort_keys=True)


def _model_line(role: str, m: dict[str, Any]) -> str:
    where = m["checkpoint"]
    # The plan may describe a run on another machine, so a checkpoint that is not here is a note, not an error.
    missing = " (not found from here: the run refuses it)" if where and not Path(where).exists() else ""
    return (f"{role}: {_arch(m['arch'])}" + (f" from {where}{missing}" if where else
                                             "" if m["inherit"] else " (no checkpoint: random weights)"))


def _data_line(data: dict[str, Any]) -> str:
    where = (f"generated in {data['generated']} from {data['generator']}" if data["generated"]
             else f"read from {data['root']}")
    return f"data: {data['name']}, {where}"


def _run_line(report: dict[str, Any]) -> str:
    a, h = report["accumulation"], report["hub"]
    return (f"output folder: {report['output_dir']}"
            + (" (replaces a run already there: training.overwrite_output_dir)" if report.get("overwrite_output_dir")
               else "") + f"; resume: {report['resume'] or 'no'}"
            + (f"; hub: {h['repo_id']}" + (" (pushed at the end)" if h["push"] else "") if h else "")
            + f"\naccumulation: {a['mode']}, {a['micro_batches_per_step']} micro-batch(es) per step; "
            f"non-finite losses skipped before stopping: {report['nonfinite_skips']}")


def _job_lines(jobs: list[dict[str, Any]], indent: str = "  ") -> list[str]:
    lines = []
    for j in jobs:
        warm = f", warm-up {j['warm_up_iters']} steps" if j["warm_up_iters"] > 0 else ""
        lines.append(f"{indent}mimic job {j['name']}: loss {j['loss']}"
                     + (f" {j['loss_kwargs']}" if j["loss_kwargs"] else "")
                     + f" x {j['weight']:g}{warm}; teachers combined by {j['reduce']}; adapter {j['adapter']}")
        for teacher, taps in j["teachers"].items():
            for student_tap, teacher_tap in zip(j["student"], taps):
                lines.append(f"{indent}  student {student_tap} <- {teacher} {teacher_tap}")
    return lines


def _format_task_plan(report: dict[str, Any]) -> str:
    t = report["training"]
    lines = [_title(report), _data_line(report["data"]), _model_line("student", report["student"])]
    lines.extend(_model_line(f"teacher {name}", m) for name, m in report["teachers"].items())
    lines.append(_run_line(report))
    lines.append(f"\none stage: {t['length']}; task loss: {'yes' if report['task_loss'] else 'no (mimic only)'}")
    lines.append(f"  optimiser: Trainer {t['optim']}, lr {t['learning_rate']:g}, weight decay {t['weight_decay']:g}, "
                 f"{t['lr_scheduler_type']} schedule")
    lines.extend(_job_lines(report["mimic_jobs"]))
    lines.append(f"\ncheckpoint kept: {report['checkpoint_kept']}")
    return "\n".join(lines)
