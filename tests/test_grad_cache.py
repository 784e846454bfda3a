"""Exact accumulation (``distill/grad_cache.py``): k micro-batches give the update of one batch of k*b.

The models have dropout on (attention dropout and patch dropout), every item a different image
tensor, fp32, one SGD step: the trained student must equal a reference computed here, without
the gradient cache: the whole group's embeddings with autograd (the micro-batches embedded one
after the other from the RNG state the step started with, so dropout draws what the step drew),
every term on their concatenation, one backward, one SGD update. With dropout off the reference is
the real trainer on one batch of k*b, and plain accumulation is shown to differ from it.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import TrainingArguments

from kd_trainer.distill.core import NonFiniteLossError
from kd_trainer.distill.grad_cache import ExactAccumulation, RngState, exact_group_arguments, split_group
from kd_trainer.distill.retrieval import RetrievalTrainer
from kd_trainer.losses import TERMS, Features, compute_term, get_term
from kd_trainer.models.factory import create_model, get_architecture
from kd_trainer.models.towers import TOWER_PREFIXES
from kd_trainer.recipe import LossConfig, StageConfig, TermConfig
from kd_trainer.recipe.mimic import MimicJob

from tiny import batch_items, gloo_env, plan_of, spawn_gloo

K, B = 2, 4  # micro-batches per group, samples per micro-batch
LR = 0.5
TOL = 1e-5
PROJ = 48  # the teacher's width: direct comparisons go through the student's projections
BATCH_DEPENDENT = sorted(n for n, s in TERMS.items() if s.batch_dependent)
TOWER_INPUTS = {"image": "pixel_values", "text": "input_ids"}


# The retrieval trainer with exact accumulation; the test adds the mixin while RetrievalTrainer
# does not inherit it itself (once it does, this is RetrievalTrainer).
ExactRetrievalTrainer = RetrievalTrainer if issubclass(RetrievalTrainer, ExactAccumulation) else \
    type("ExactRetrievalTrainer", (ExactAccumulation, RetrievalTrainer), {"tower_inputs": TOWER_INPUTS})


class ExactTrainer(ExactRetrievalTrainer):
    """Records each step's RNG state and group: what the reference needs to draw the same dropout
    masks from the same samples."""

    def __init__(self, *args, **kwargs):
        self.recorded: list[tuple[torch.Tensor, dict[str, torch.Tensor]]] = []
        super().__init__(*args, **kwargs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.recorded.append((torch.get_rng_state(), {k: v.detach().clone() for k, v in inputs.items()}))
        return super().training_step(model, inputs, num_items_in_batch)


def make_pair(dropout: bool = True) -> tuple[nn.Module, nn.Module]:
    """A micro student (attention and patch dropout when ``dropout``) with projections to the
    teacher's width, and a wider micro teacher."""
    arch = get_architecture("micro")
    if dropout:
        arch["vision_cfg"]["patch_dropout"] = 0.25
    torch.manual_seed(0)
    student = create_model(arch, projection_dim=PROJ)
    for m in student.modules():
        if isinstance(m, nn.MultiheadAttention):
            m.dropout = 0.2 if dropout else 0.0
    wide = get_architecture("micro")
    wide["embed_dim"] = PROJ
    torch.manual_seed(1)
    return student, create_model(wide)


def arguments(tmp_path: Path, name: str, *, batch: int, accum: int = 1, steps: int = 1, **extra) -> TrainingArguments:
    base = dict(output_dir=str(tmp_path / name), per_device_train_batch_size=batch, gradient_accumulation_steps=accum,
                max_steps=steps, learning_rate=LR, optim="sgd", lr_scheduler_type="constant", warmup_steps=0,
                weight_decay=0.0, max_grad_norm=0.0, report_to="none", save_strategy="no", logging_steps=1, seed=0,
                remove_unused_columns=False, use_cpu=True, disable_tqdm=True)
    return TrainingArguments(**{**base, **extra})


def train_exact(tmp_path, pair, *, terms=None, stages=None, steps=1, items=None, skips=0, **extra) -> ExactTrainer:
    """Train ``pair``'s student with exact accumulation of K micro-batches of B; ``extra``: TrainingArguments."""
    student, teacher = pair
    trainer = ExactTrainer(model=student, args=arguments(tmp_path, "exact", batch=K * B, steps=steps, **extra),
                           plan=plan_of(terms, stages), teacher=teacher,
                           train_dataset=items or batch_items(K * B),
                           exact_accumulation_steps=K, max_nonfinite_skips=skips)
    trainer.train()
    return trainer


def max_diff(a: nn.Module, b: nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def assert_same_weights(got: nn.Module, want: nn.Module) -> None:
    """Equal to 1e-5, absolute and relative: fp32 sums taken in another order differ by ~1e-7 of
    the weights' size."""
    for (name, w), g in zip(want.named_parameters(), got.parameters()):
        torch.testing.assert_close(g.detach(), w.detach(), atol=TOL, rtol=TOL, msg=lambda m: f"{name}: {m}")


# --- the reference: one batch of k*b, written without the gradient cache ---------------------------


def reference_step(model: nn.Module, teacher: nn.Module, rng: torch.Tensor | list[torch.Tensor],
                   groups: list[dict[str, torch.Tensor]], terms: list[TermConfig], trains: str = "all",
                   micro: int = B, lr: float = LR) -> None:
    """One SGD step of ``model`` in place on the concatenation of ``groups`` (one per process),
    each group's micro-batches embedded in order from its process's RNG state ``rng``.

    The order of dropout draws is the exact step's: per micro-batch, the towers the stage freezes
    (without autograd), then the trained towers, image before text.
    """
    rngs = rng if isinstance(rng, list) else [rng]
    towers = {t.removeprefix("student_") for c in terms for t in get_term(c.name).embeddings(c.side)}
    frozen = [t for t in ("image", "text") if t in towers and trains not in ("all", t)]
    trained = [t for t in ("image", "text") if t in towers and t not in frozen]
    out: dict[str, list[torch.Tensor]] = {}
    model.train()
    for state, group in zip(rngs, groups):
        torch.set_rng_state(state)
        for lo in range(0, group["pids"].shape[0], micro):
            for tower in frozen + trained:
                with torch.no_grad() if tower in frozen else torch.enable_grad():
                    key = TOWER_INPUTS[tower]
                    embeds = model(**{key: group[key][lo:lo + micro]})
                for k, v in embeds.items():
                    out.setdefault(k, []).append(v)
    cat = {k: torch.cat(v) for k, v in out.items()}
    whole = {k: torch.cat([g[k] for g in groups]) for k in groups[0]}
    with torch.no_grad():
        teach = {"teacher_image": teacher.clip.encode_image(whole["pixel_values"]),
                 "teacher_text": teacher.clip.encode_text(whole["input_ids"])}
    plain = Features(student_image=cat.get("image_embeds"), student_text=cat.get("text_embeds"),
                     pids=whole["pids"], **teach)
    projected = Features(student_image=cat.get("image_embeds_proj"), student_text=cat.get("text_embeds_proj"),
                         pids=whole["pids"], **teach)
    loss = sum(c.weight * compute_term(c.name, projected if get_term(c.name).direct_compare else plain,
                                       temperature=c.temperature or get_term(c.name).default_temperature,
                                       side=c.side)
               for c in terms)
    model.zero_grad(set_to_none=True)
    loss.backward()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.grad is not None and (trains == "all" or name.startswith(TOWER_PREFIXES[trains])):
                p -= lr * p.grad
    model.zero_grad(set_to_none=True)


def widest_side(name: str) -> str:
    return "both" if "both" in TERMS[name].sides else TERMS[name].sides[0]


# --- single process ------------------------------------------------------------------------------


def test_the_test_models_have_dropout_on():
    """Otherwise the RNG replay would be tested by nothing."""
    student, _ = make_pair()
    student.train()
    x = torch.stack([i["pixel_values"] for i in batch_items(4)])
    ids = torch.stack([i["input_ids"] for i in batch_items(4)])
    a, b = student(pixel_values=x, input_ids=ids), student(pixel_values=x, input_ids=ids)
    assert (a["image_embeds"] - b["image_embeds"]).abs().max() > 1e-3
    assert (a["text_embeds"] - b["text_embeds"]).abs().max() > 1e-3


@pytest.mark.parametrize("name", BATCH_DEPENDENT)
def test_exact_accumulation_is_one_batch_of_k_times_b(tmp_path, name):
    terms = [TermConfig(name=name, side=widest_side(name))]
    start = make_pair()
    trainer = train_exact(tmp_path, copy.deepcopy(start), terms=terms)
    (rng, group), = trainer.recorded
    assert group["pids"].shape[0] == K * B
    want = copy.deepcopy(start[0])
    reference_step(want, start[1], rng, [group], terms)
    assert max_diff(want, start[0]) > 1e-3, "the step must move the weights"
    assert_same_weights(trainer.model, want)


def test_without_dropout_exact_matches_the_real_big_batch_and_plain_accumulation_does_not(tmp_path):
    terms = [TermConfig(name="itc", weight=0.5), TermConfig(name="sdm"), TermConfig(name="motis"),
             TermConfig(name="crd")]
    start = make_pair(dropout=False)
    exact = train_exact(tmp_path, copy.deepcopy(start), terms=terms)

    def plain(batch: int, accum: int) -> nn.Module:
        student, teacher = copy.deepcopy(start)
        RetrievalTrainer(model=student, args=arguments(tmp_path, f"b{batch}a{accum}", batch=batch, accum=accum),
                         plan=plan_of(terms), teacher=teacher, train_dataset=batch_items(K * B)).train()
        return student

    big, accumulated = plain(K * B, 1), plain(B, K)
    assert max_diff(big, start[0]) > 1e-3
    assert_same_weights(exact.model, big)
    assert max_diff(accumulated, big) > 100 * TOL  # k softmaxes over b are another objective


def test_staged_plan_skips_frozen_towers_in_the_replay(tmp_path):
    stages = [StageConfig(name="image", steps=1, trainable="image",
                          loss=LossConfig(terms=[TermConfig(name="itc"), TermConfig(name="motis", side="image")])),
              StageConfig(name="both", steps=1, trainable="all",
                          loss=LossConfig(terms=[TermConfig(name="sdm"), TermConfig(name="cross_kd")]))]
    start = make_pair()
    student, teacher = copy.deepcopy(start)
    text_calls: list[bool] = []  # grad mode of each forward of the student's text transformer
    student.clip.transformer.register_forward_hook(lambda m, i, o: text_calls.append(torch.is_grad_enabled()))
    image_calls: list[bool] = []
    student.clip.visual.register_forward_hook(lambda m, i, o: image_calls.append(torch.is_grad_enabled()))
    # sdm's gradients at its temperature of 0.02 are large: a smaller step keeps fp32 rounding
    # of the updated weights below the tolerance.
    trainer = train_exact(tmp_path, (student, teacher), stages=stages, steps=2, learning_rate=0.05)

    # Stage 1 trains the image tower: the text tower embeds each micro-batch once, without
    # autograd; the image tower twice (without, then with autograd). Stage 2 replays both.
    assert text_calls == [False] * K + [False] * K + [True] * K
    assert image_calls == [False] * K + [True] * K + [False] * K + [True] * K

    want = copy.deepcopy(start[0])
    for (rng, group), stage in zip(trainer.recorded, stages):
        reference_step(want, start[1], rng, [group], stage.loss.terms, trains=stage.trainable, lr=0.05)
    assert max_diff(want, start[0]) > 1e-3
    assert_same_weights(trainer.model, want)


def test_resume_from_a_checkpoint_continues_the_same_run(tmp_path):
    terms = [TermConfig(name="itc"), TermConfig(name="cross_kd")]
    items = batch_items(2 * K * B)
    start = make_pair()
    straight = train_exact(tmp_path / "straight", copy.deepcopy(start), terms=terms, steps=2, items=items)

    first = train_exact(tmp_path / "split", copy.deepcopy(start), terms=terms, steps=1, items=items,
                        save_strategy="steps", save_steps=1)
    assert max_diff(first.model, straight.model) > 1e-3
    student, teacher = copy.deepcopy(start)
    resumed = ExactTrainer(model=student, args=arguments(tmp_path / "split", "exact", batch=K * B, steps=2),
                           plan=plan_of(terms), teacher=teacher, train_dataset=items, exact_accumulation_steps=K)
    resumed.train(resume_from_checkpoint=str(tmp_path / "split" / "exact" / "checkpoint-1"))
    assert len(resumed.recorded) == 1  # only the second step ran
    assert max_diff(resumed.model, straight.model) < 1e-6


def test_a_non_finite_group_is_skipped_with_no_gradient(tmp_path):
    terms = [TermConfig(name="itc")]
    items = batch_items(K * B)
    items[3]["pixel_values"] = torch.full_like(items[3]["pixel_values"], float("nan"))
    start = make_pair()
    trainer = train_exact(tmp_path, copy.deepcopy(start), terms=terms, items=items, skips=1)
    assert trainer.nonfinite_skipped == 1
    assert max_diff(trainer.model, start[0]) == 0.0
    with pytest.raises(NonFiniteLossError, match="itc"):
        train_exact(tmp_path / "stop", copy.deepcopy(start), terms=terms, items=items)


def test_what_exact_accumulation_refuses(tmp_path):
    student, teacher = make_pair()
    common = dict(plan=plan_of([TermConfig(name="itc")]), teacher=teacher, train_dataset=batch_items(K * B),
                  exact_accumulation_steps=K)
    with pytest.raises(ValueError, match="gradient_accumulation_steps must be 1"):
        ExactTrainer(model=student, args=arguments(tmp_path, "a", batch=K * B, accum=2), **common)
    with pytest.raises(ValueError, match="multiple of 2"):
        ExactTrainer(model=student, args=arguments(tmp_path, "b", batch=K * B + 1), **common)
    with pytest.raises(ValueError, match="auto_find_batch_size"):
        ExactTrainer(model=student, args=arguments(tmp_path, "e", batch=K * B, auto_find_batch_size=True), **common)
    with pytest.raises(ValueError, match="integer >= 1"):
        ExactTrainer(model=student, args=arguments(tmp_path, "c", batch=K * B), **{**common,
                                                                                   "exact_accumulation_steps": 0})
    job = MimicJob(loss={"type": "l2"}, teachers={"teacher": ["clip.visual.transformer.resblocks.0"]},
                   student=["clip.visual.transformer.resblocks.0"])
    with pytest.raises(ValueError, match="mimic jobs"):
        ExactTrainer(model=student, args=arguments(tmp_path, "d", batch=K * B), mimic_jobs=[job], **common)


def test_recipe_translation_keeps_the_global_batch():
    training, k = exact_group_arguments({"gradient_accumulation_steps": 4, "per_device_train_batch_size": 16,
                                         "learning_rate": 1e-5})
    assert k == 4 and training == {"gradient_accumulation_steps": 1, "per_device_train_batch_size": 64,
                                   "learning_rate": 1e-5}
    assert exact_group_arguments({})[1] == 1


def test_rng_replay_draws_the_same_and_leaves_the_generator_alone():
    state = RngState.capture(torch.device("cpu"))
    first = torch.rand(5)
    after = torch.get_rng_state()
    with state.replay():
        again = torch.rand(5)
    assert torch.equal(first, again)
    assert torch.equal(torch.get_rng_state(), after)


def test_split_group_refuses_what_it_cannot_split():
    batch = {"pixel_values": torch.zeros(5, 3), "pids": torch.arange(5)}
    parts = split_group(batch, 2)
    assert [p["pids"].tolist() for p in parts] == [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError, match="different numbers of samples"):
        split_group({"a": torch.zeros(4), "b": torch.zeros(3)}, 2)
    with pytest.raises(TypeError, match="not batched tensors"):
        split_group({"a": torch.zeros(4), "names": ["x"] * 4}, 2)


# --- two gloo processes --------------------------------------------------------------------------

DDP_B = 2  # per process: a group of K micro-batches of 2, global batch 2 * K * 2 = 8
ALL_TERMS = [TermConfig(name=n, side=widest_side(n)) for n in BATCH_DEPENDENT]


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    gloo_env(rank, world, port)
    torch.set_num_threads(1)
    student, teacher = make_pair()
    args = arguments(Path(out), "run", batch=K * DDP_B)
    trainer = ExactTrainer(model=student, args=args, plan=plan_of(ALL_TERMS), teacher=teacher,
                           train_dataset=batch_items(world * K * DDP_B), exact_accumulation_steps=K)
    assert trainer.accelerator.num_processes == world
    trainer.train()
    (rng, group), = trainer.recorded
    torch.save({"rng": rng, "group": group, "params": [p.detach() for p in student.parameters()]},
               Path(out) / f"rank{rank}.pt")


def test_two_processes_with_exact_accumulation_are_one_batch_of_the_global_group(tmp_path):
    """Every batch-dependent term at once, gathered across 2 processes (local rows), dropout on."""
    spawn_gloo(_ddp_worker, 2, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for p, q in zip(ranks[0]["params"], ranks[1]["params"]):
        assert torch.equal(p, q), "DDP keeps the processes' weights equal"
    assert not torch.equal(ranks[0]["group"]["pids"], ranks[1]["group"]["pids"])  # each its own samples
    start, teacher = make_pair()
    want = copy.deepcopy(start)
    reference_step(want, teacher, [r["rng"] for r in ranks], [r["group"] for r in ranks], ALL_TERMS, micro=DDP_B)
    assert max_diff(want, start) > 1e-3
    with torch.no_grad():
        for p, trained in zip(start.parameters(), ranks[0]["params"]):
            p.copy_(trained)
    assert_same_weights(start, want)
