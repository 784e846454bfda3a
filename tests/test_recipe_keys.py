"""Every recipe key does what it says or is refused (issue 13).

Two checks. Statically, every field of every recipe schema is read somewhere in the code that
runs a recipe (a key that is parsed and then never read, as `mimic.task_loss` once was, fails
here). Dynamically, every key that shapes training changes the resolved plan that
``kd-trainer plan`` prints, and keys that make no sense together are refused.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from kd_trainer.plan_view import plan_report
from kd_trainer.recipe import RecipeError, parse_recipe
from kd_trainer.recipe import mimic as mimic_schema
from kd_trainer.recipe import optim as optim_schema
from kd_trainer.recipe import schema

PACKAGE = Path(__file__).resolve().parent.parent / "kd_trainer"
SCHEMA_FILES = {PACKAGE / "recipe" / "schema.py", PACKAGE / "recipe" / "mimic.py", PACKAGE / "recipe" / "optim.py"}
MODELS = [m for mod in (schema, mimic_schema, optim_schema) for m in vars(mod).values()
          if isinstance(m, type) and issubclass(m, BaseModel) and m.__module__ == mod.__name__
          and not m.__name__.startswith("_")]
# Read by the schema itself: `type` is pydantic's discriminator; UP's per-teacher `teacher_weight`
# (a checkpoint path, kept as teacher_checkpoints) becomes that teacher's `checkpoint` at parse time.
READ_IN_SCHEMA = {"type", "teacher_checkpoints"}


def _code_without_declarations() -> str:
    """The package's code, minus the lines that declare schema fields (``name: type = Field(...)``):
    a field counts as read only where something uses it (a run, a plan, a job's weight method)."""
    declaration = re.compile(r"^\s+\w+: [^=]+(=.*)?$")
    lines = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for line in path.read_text().splitlines():
            if not (path in SCHEMA_FILES and declaration.match(line) and "(" not in line.split(":")[0]):
                lines.append(line)
    return "\n".join(lines)


CODE = _code_without_declarations()
FIELDS = sorted({(m.__name__, f) for m in MODELS for f in m.model_fields if f not in READ_IN_SCHEMA})


def test_the_keys_read_at_parse_time_are_recipe_keys():
    """Left out of the check below; a name that is no longer a field would hide nothing, so it must go."""
    assert READ_IN_SCHEMA <= {f for m in MODELS for f in m.model_fields}


@pytest.mark.parametrize("model, field", FIELDS, ids=[f"{m}.{f}" for m, f in FIELDS])
def test_every_recipe_key_is_read_by_the_code_that_runs_it(model, field):
    # Attribute access (cfg.field), a keyword of a call (field=...), a dict key, or a dump passed
    # on whole (**cfg.model_dump(), as the data generators take their blocks).
    patterns = [rf"\.{field}\b", rf"\b{field}=", rf"[\"']{field}[\"']"]
    dumped = {"SynthConfig", "ShapesConfig", "SynthDetConfig"}
    if model in dumped:
        return  # passed to the generator as **block.model_dump(): every field is an argument
    assert any(re.search(p, CODE) for p in patterns), f"{model}.{field} is parsed but nothing reads it"


BASE = {
    "name": "keys", "data": {"name": "synth_pedes", "image_size": [32, 16]},
    "student": {"arch": "micro"}, "teacher": {"arch": "micro"},
    "stages": [
        {"name": "image", "epochs": 2, "trainable": "image",
         "loss": {"terms": [{"name": "motis", "side": "image"}, {"name": "st_itc"}]}},
        {"name": "joint", "epochs": 3, "loss": {"alpha": 0.5, "terms": [{"name": "motis"}, {"name": "itc"}]}},
    ],
    "training": {"eval_strategy": "epoch"},
}


def _plan(overrides: list[tuple[list, object]]) -> dict:
    raw = copy.deepcopy(BASE)
    for path, value in overrides:
        node = raw
        for k in path[:-1]:
            node = node.setdefault(k, {}) if isinstance(node, dict) else node[k]
        node[path[-1]] = value
    return plan_report(parse_recipe(raw))


@pytest.mark.parametrize("path, value", [
    (["stages", 0, "loss", "terms", 0, "temperature"], 0.3),
    (["stages", 0, "loss", "terms", 0, "weight"], 2.0),
    (["stages", 0, "loss", "terms", 1, "group"], "distill"),
    (["stages", 0, "loss", "terms", 0, "side"], "text"),
    (["stages", 1, "loss", "alpha"], 0.7),
    (["stages", 0, "epochs"], 4),
    (["stages", 0, "trainable"], "text"),
    (["stages", 0, "learning_rate"], 0.5),
    (["stages", 0, "eval_hybrids"], []),
    (["stages", 1, "optim"], {"preset": "irra", "lr": 2e-5}),
    (["optim"], {"preset": "irra"}),
    (["precision"], "irra_fp16"),
    (["select"], {"metric": "mAP", "split": "test"}),
    (["student", "vision_layers"], 2),
    (["student", "inherit"], {"layers": "uniform"}),
    (["contrastive_accumulation"], "exact"),
    (["training", "gradient_accumulation_steps"], 4),
    (["nonfinite_skips"], 3),
    (["data", "verify_images"], True),
    (["data", "duplicates"], "drop"),
])
def test_keys_that_shape_training_change_the_plan(path, value):
    assert _plan([(path, value)]) != _plan([])


@pytest.mark.parametrize("overrides, match", [
    ([(["select"], {"metric": "r1"}), (["training", "eval_strategy"], "no")], "must evaluate"),
    ([(["optim"], {"preset": "irra"}), (["stages", 0, "learning_rate"], 1e-4)], "stages.N.optim.lr"),
    ([(["precision"], "irra_fp16"), (["training", "bf16"], True)], "drop training.bf16"),
    ([(["optim"], {"preset": "trainer", "lr": 1e-3})], "move \\['lr'\\] there"),
    ([(["mimic"], {"jobs": [{"loss": {"type": "l2"}, "teachers": {"teacher": ["clip.visual"]},
                             "student": ["clip.visual"]}], "task_loss": False})], "task_loss: false only"),
])
def test_keys_that_cannot_do_what_they_say_are_refused(overrides, match):
    with pytest.raises(RecipeError, match=match):
        _plan(overrides)
