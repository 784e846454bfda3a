"""The resolved run: every decision of a run is made once, from the recipe, and read from one object.

Each test changes one recipe key and checks that the decision it drives changes in the resolved
run; the trainer tests check that the trainer follows the object and has no other path to it.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from kd_trainer.data.collator import collate_retrieval
from kd_trainer.distill.resolved import resolve_run
from kd_trainer.distill.retrieval import RetrievalTrainer
from kd_trainer.plan_view import format_plan, plan_report
from kd_trainer.recipe import parse_recipe

from tiny import batch_items, micro_pair

PACKAGE = Path(__file__).resolve().parent.parent / "kd_trainer"


def recipe(tmp_path: Path, **extra: Any):
    raw = {"name": "r", "data": {"name": "synth_pedes", "image_size": [32, 16]}, "student": {"arch": "micro"},
           "teacher": {"arch": "micro"}, "loss": {"terms": [{"name": "itc"}, {"name": "cross_kd"}]},
           "training": {"output_dir": str(tmp_path / "out")}}
    for key, value in extra.items():
        raw[key] = value if not isinstance(value, dict) or key not in raw else {**raw[key], **value}
    return parse_recipe(raw)


def test_the_teacher_source_is_decided_once_and_follows_the_recipe(tmp_path):
    live = resolve_run(recipe(tmp_path)).plan.stages[0].teacher_source
    cached = resolve_run(recipe(tmp_path, teacher={"cache": str(tmp_path / "cache")})).plan.stages[0].teacher_source
    assert (live.use_cache, cached.use_cache) == (False, True)
    assert cached.cached_terms == ("cross_kd",) and live.online_terms == ("cross_kd",)
    block = "clip.visual.transformer.resblocks.0"
    mimic = [{"loss": {"type": "cosine"}, "teachers": {"teacher": [block]}, "student": [block]}]
    on_teacher = resolve_run(recipe(tmp_path, teacher={"cache": str(tmp_path / "cache")}, mimic=mimic))
    source = on_teacher.plan.stages[0].teacher_source
    assert on_teacher.teacher.live and source.for_mimic and not source.use_cache and "cache unused" in source.message


class FakeCache:
    """A teacher cache whose embeddings are recognisable (all 7), and that counts its lookups."""

    def __init__(self) -> None:
        self.lookups = 0

    def to(self, device: Any) -> "FakeCache":
        return self

    def lookup(self, inputs: dict[str, torch.Tensor], towers: frozenset[str]) -> dict[str, torch.Tensor]:
        self.lookups += 1
        return {t: torch.full((len(inputs["input_ids"]), 32), 7.0) for t in towers}


@pytest.mark.parametrize("cache_in_recipe", [True, False])
def test_the_trainer_reads_the_teacher_source_from_the_resolved_run_only(tmp_path, tiny_args, cache_in_recipe):
    """Given a cache object either way, the trainer reads it only when the resolved run says so."""
    extra = {"teacher": {"cache": str(tmp_path / "cache")}} if cache_in_recipe else {}
    run = resolve_run(recipe(tmp_path, **extra))
    student, teacher = micro_pair()
    cache = FakeCache()
    trainer = RetrievalTrainer(model=student, args=tiny_args(), plan=run.plan, teacher=teacher, teacher_cache=cache,
                               train_dataset=batch_items(8))
    out = trainer.teacher_outputs(collate_retrieval(batch_items(4)), run.plan.stages[0])
    assert set(out) == {"teacher_image", "teacher_text"}
    from_cache = all(torch.equal(v, torch.full_like(v, 7.0)) for v in out.values())
    assert from_cache == cache_in_recipe and cache.lookups == int(cache_in_recipe)


def test_what_the_teacher_is_loaded_for(tmp_path):
    kd = resolve_run(recipe(tmp_path)).teacher
    assert (kd.load, kd.in_training) == (True, True)
    plain = recipe(tmp_path, loss={"terms": [{"name": "itc"}]})
    assert not resolve_run(plain).teacher.load  # a teacher nobody reads is not built
    inherited = recipe(tmp_path, loss={"terms": [{"name": "itc"}]}, student={"arch": "micro", "inherit": {}})
    inh = resolve_run(inherited).teacher
    assert (inh.load, inh.in_training) == (True, False)  # built for its weights, then dropped


def test_projection_width_and_splits(tmp_path):
    wide = {"arch": "tiny-student"}  # 128 wide; micro is 32
    assert resolve_run(recipe(tmp_path, teacher=wide, loss={"terms": [{"name": "motis"}]})).projection_dim == 128
    assert resolve_run(recipe(tmp_path, teacher=wide)).projection_dim is None  # cross_kd compares scores
    assert resolve_run(recipe(tmp_path)).eval_split is None  # nothing evaluated during training
    evaluating = recipe(tmp_path, training={"eval_strategy": "epoch"}, data={"eval_split": "val"})
    assert resolve_run(evaluating).eval_split == "val"
    selecting = recipe(tmp_path, training={"eval_strategy": "epoch"}, select={"metric": "mAP", "split": "test"})
    assert resolve_run(selecting).eval_split == "test"


def test_training_arguments_k_and_the_output_folder_are_built_once(tmp_path):
    run = resolve_run(recipe(tmp_path, contrastive_accumulation="exact",
                             training={"per_device_train_batch_size": 2, "gradient_accumulation_steps": 4}))
    assert run.accumulation_steps == 4 and run.micro_batches == 4
    assert (run.args.per_device_train_batch_size, run.args.gradient_accumulation_steps) == (8, 1)
    assert run.output_dir == str(tmp_path / "out")
    default = resolve_run(parse_recipe({"name": "named", "data": {"name": "synth_pedes"}, "student": {"arch": "micro"},
                                        "loss": {"terms": [{"name": "itc"}]}}))
    assert default.output_dir == str(Path("runs") / "named") and default.micro_batches == 1
    hub = resolve_run(recipe(tmp_path, training={"hub_model_id": "me/s", "push_to_hub": True, "hub_token": "hf_x"}))
    assert (hub.hub.repo_id, hub.hub.push, hub.args.push_to_hub) == ("me/s", True, False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.accumulation_steps = 2


def test_plan_prints_the_resolved_run_and_never_the_token(tmp_path):
    text = format_plan(plan_report(recipe(tmp_path, teacher={"cache": str(tmp_path / "cache")},
                                          training={"hub_model_id": "me/s", "hub_token": "hf_secret"})))
    assert f"output folder: {tmp_path / 'out'}" in text
    assert "teacher: loaded, beside the student in training, cache" in text
    assert "teacher source: stage 'train': teacher embeddings from the cache for ['cross_kd']" in text
    assert "hub: me/s" in text and "hf_secret" not in text


def test_the_raw_training_block_is_read_only_where_the_run_is_resolved():
    """The schema validates ``training:`` and resolve_run builds TrainingArguments from it; everything
    else (runner, trainers, ``kd-trainer plan``) reads those, never the dict and its copied defaults."""
    allowed = {PACKAGE / "recipe" / "schema.py", PACKAGE / "distill" / "resolved.py"}
    readers = [f"{p.relative_to(PACKAGE.parent)}:{i}" for p in sorted(PACKAGE.rglob("*.py")) if p not in allowed
               for i, line in enumerate(p.read_text().splitlines(), 1) if re.search(r"\brecipe\.training\b", line)]
    assert not readers, readers


def test_the_retrieval_plan_is_the_resolved_run_with_its_stages_bound_to_the_student(tmp_path):
    """`kd-trainer plan` adds to the resolved run only what needs the student: per stage its tensors,
    optimiser groups and per-epoch values, bound on a meta-device model (and an inherited layer map)."""
    r = recipe(tmp_path, teacher={"cache": str(tmp_path / "cache")}, stages=[
        {"name": "image", "trainable": "image", "epochs": 2, "loss": {"terms": [{"name": "itc"}]}},
        {"name": "joint", "trainable": "all", "steps": 5, "loss": {"terms": [{"name": "cross_kd"}]}}], loss=None)
    report, described = plan_report(r), resolve_run(r).describe()
    assert {k: v for k, v in report.items() if k not in ("stages", "inheritance")} == \
        {k: v for k, v in described.items() if k != "stages"}
    bound = {"epochs", "trainable_tensors", "no_autograd_towers", "alpha_per_epoch", "optimiser", "frozen_tower"}
    for got, want in zip(report["stages"], described["stages"], strict=True):
        assert {k: v for k, v in got.items() if k not in bound} == {k: v for k, v in want.items() if k not in bound}
    assert [s["epochs"] for s in report["stages"]] == [2, None]  # a stage in steps has no epochs
    assert report["stages"][0]["no_autograd_towers"] == ["text"] and report["stages"][1]["no_autograd_towers"] == []
    first, second = (s["teacher_source"] for s in described["stages"])  # each stage's own source
    assert "from the cache" not in first and "teacher embeddings from the cache for ['cross_kd']" in second
