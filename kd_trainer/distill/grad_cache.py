"""Exact gradient accumulation for batch-dependent terms: the gradient cache (Gao et al. 2021).

Why it exists: every contrastive and relational term compares each sample with the rest of its
batch, so ``k`` micro-batches of ``b`` accumulated the plain way optimise ``k`` softmaxes over
``b`` samples, not one over ``k*b``. A device that cannot hold the activations of ``k*b``
samples could then never reproduce a method's published batch. The gradient cache computes the
loss of the whole group while holding the activations of one micro-batch at a time. For one
group (one optimizer step):

1. embed every micro-batch without autograd: the teacher (or its cache), then the student, the
   RNG state (CPU and the device's) saved before each student forward;
2. compute every term on the whole group's embeddings (gathered across processes as in any step);
3. take the gradient ``g_j = dL/de_j`` of the weighted total with respect to the student
   embeddings ``e_j`` only (they are the leaves of this small graph);
4. run each micro-batch's student forward again, with autograd and its RNG state restored, so
   dropout draws the same masks, and backpropagate ``g_j``: the gradient of
   ``sum_j <e_j(theta), g_j>``, which is ``dL/dtheta`` because ``L`` depends on the student's
   parameters only through its embeddings.

The parameter gradient is then the one a single batch of ``k*b`` gives, up to float rounding
(``tests/test_grad_cache.py``). Augmentation needs no replay: the seeded transforms fixed it in
the batch tensors. The teacher runs once per sample, as in a plain step; the student runs one
extra forward without autograd per micro-batch. Peak memory is one micro-batch's activations
plus ``k*b`` embeddings and their gradients.

Frozen towers (a stage that trains none of a tower's parameters) have no gradient to replay:
given ``tower_inputs``, a frozen tower embeds once, before the trained towers and without
autograd, and is skipped in the replay. The RNG state is saved after it, so the trained towers
draw the same dropout masks in both passes.

Under DDP the first ``k-1`` replays run under ``no_sync`` and the last one synchronises the
accumulated gradients, once per step. Every process must run as many micro-batches, which
accelerate's default ``even_batches`` guarantees (the last group of an epoch is filled up to the
same size on every process).

The trainer's DataLoader yields the whole group (``per_device_train_batch_size = k*b``) and its
own accumulation is 1, so an optimizer step is one group: resuming, LR schedules and stage
lengths count steps as with plain accumulation. :func:`exact_group_arguments` makes that
translation of a recipe's ``training:`` block.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, ContextManager, Iterator, Mapping, Sequence

import torch
from torch import nn
from transformers import TrainingArguments

from kd_trainer.recipe.mimic import check_exact_accumulation

__all__ = ["ExactAccumulation", "RngState", "accumulate_exactly", "exact_group_arguments", "split_group"]

Batch = Mapping[str, torch.Tensor]
Embeddings = Mapping[str, torch.Tensor]


def _default(field: str) -> Any:
    """``TrainingArguments``' own default for ``field`` (read from it, never copied here)."""
    return TrainingArguments.__dataclass_fields__[field].default


def exact_group_arguments(training: Mapping[str, Any]) -> tuple[dict[str, Any], int]:
    """A recipe's ``training:`` block for exact accumulation, and its number of micro-batches.

    ``gradient_accumulation_steps: k`` with ``per_device_train_batch_size: b`` becomes a
    DataLoader batch of ``k*b`` (the group) with the Trainer's own accumulation at 1; the trainer
    splits each group into ``k`` micro-batches of ``b`` (:class:`ExactAccumulation`). The global
    batch, the steps per epoch and the LR schedule are those of plain accumulation.
    """
    k = int(training.get("gradient_accumulation_steps", _default("gradient_accumulation_steps")))
    b = int(training.get("per_device_train_batch_size", _default("per_device_train_batch_size")))
    return {**training, "per_device_train_batch_size": k * b, "gradient_accumulation_steps": 1}, k


def split_group(inputs: Batch, micro_batch_size: int) -> list[dict[str, torch.Tensor]]:
    """The group's micro-batches of ``micro_batch_size`` samples, in order (the last may be shorter).

    Every value must be a tensor whose first dimension is the sample: a value that is not would
    be split wrongly or dropped, so it is an error.
    """
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    bad = {k: type(v).__name__ for k, v in inputs.items() if not torch.is_tensor(v) or v.dim() == 0}
    if bad:
        raise TypeError(f"exact accumulation splits every batch entry along its first dimension; these are not "
                        f"batched tensors: {bad}")
    sizes = {k: v.shape[0] for k, v in inputs.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"the batch entries hold different numbers of samples, {sizes}; cannot split them into "
                         "micro-batches")
    n = next(iter(sizes.values()), 0)
    return [{k: v[i:i + micro_batch_size] for k, v in inputs.items()} for i in range(0, n, micro_batch_size)]


@dataclass(frozen=True)
class RngState:
    """The CPU generator and, off the CPU, the compute device's, at one moment: what a dropout
    layer draws from. :meth:`replay` runs a block from that moment again."""

    cpu: torch.Tensor
    device: torch.device | None = None
    device_state: torch.Tensor | None = None

    @classmethod
    def capture(cls, device: torch.device) -> "RngState":
        """The generators' state now; ``device`` is where the student computes (CPU, CUDA, NPU)."""
        if device.type == "cpu":
            return cls(torch.get_rng_state())
        device = _indexed(device)
        return cls(torch.get_rng_state(), device, torch.get_device_module(device).get_rng_state(device))

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        """Run the block with the generators as captured; afterwards they are as before the block,
        so replaying changes nothing the rest of training draws."""
        devices = [self.device.index] if self.device is not None else []
        device_type = self.device.type if self.device is not None else "cuda"  # unused without devices
        with torch.random.fork_rng(devices=devices, device_type=device_type):
            torch.set_rng_state(self.cpu)
            if self.device is not None:
                torch.get_device_module(self.device).set_rng_state(self.device_state, self.device)
            yield


def _indexed(device: torch.device) -> torch.device:
    """``cuda`` -> ``cuda:<current>``: the generator of one device, named by index."""
    if device.index is not None:
        return device
    return torch.device(device.type, torch.get_device_module(device).current_device())


def _concat(parts: Sequence[Embeddings], what: str) -> dict[str, torch.Tensor]:
    keys = list(parts[0]) if parts else []
    for i, p in enumerate(parts):
        if not isinstance(p, Mapping):
            raise TypeError(f"exact accumulation needs the {what} as a mapping of name -> tensor, got "
                            f"{type(p).__name__}")
        if set(p) != set(keys):
            raise ValueError(f"micro-batch {i} gave {what} {sorted(p)}, micro-batch 0 gave {sorted(keys)}")
    return {k: torch.cat([p[k] for p in parts]) for k in keys}


def accumulate_exactly(
    micro_batches: Sequence[Batch],
    *,
    teacher: Callable[[Batch], Embeddings],
    student: Callable[[Batch], Embeddings],
    loss: Callable[[dict[str, torch.Tensor], dict[str, torch.Tensor]], torch.Tensor],
    frozen: Callable[[Batch], Embeddings] | None = None,
    backward: Callable[[torch.Tensor], Any] = torch.Tensor.backward,
    no_sync: Callable[[], ContextManager[Any]] = contextlib.nullcontext,
    on_non_finite: Callable[[torch.Tensor], torch.Tensor] | None = None,
    device: torch.device = torch.device("cpu"),
) -> torch.Tensor:
    """One group's parameter gradients, exactly those of one batch of all its micro-batches.

    Adds the gradients to ``.grad`` of the student's parameters (through ``backward``) and
    returns the group's loss, detached.

    - ``teacher(mb)``: the teacher's embeddings of a micro-batch (``{}`` when no term reads them);
    - ``student(mb)``: the student's embeddings (name -> ``n x D`` tensor); it runs twice per
      micro-batch, first without autograd, then with autograd from the same RNG state;
    - ``frozen(mb)``: optional, the embeddings of towers that train nothing, run once before
      ``student`` without autograd and never replayed (``student`` must then skip them);
    - ``loss(student_embeddings, teacher_embeddings)``: the weighted total over the whole group;
    - ``backward``: how a scalar is backpropagated (the Trainer passes ``accelerator.backward``,
      which applies fp16 loss scaling); ``no_sync()``: the context for every replay but the last
      (DDP's ``no_sync``);
    - ``on_non_finite(total)``: called when the total is NaN or infinite; it raises to stop, or
      returns the loss to report, and then the group is not replayed: no gradient. Default: raise.
    - ``device``: where the student computes, whose RNG is replayed with the CPU's.

    Step 3 runs even for a non-finite total, so every process joins the gather's collectives; a
    skipped group then skips DDP's, as the trainer core's skip does (a non-finite sample reaches
    every process's loss through the gathered columns, so they all skip together).
    """
    if not micro_batches:
        raise ValueError("exact accumulation got an empty group")
    # 1. Embed every micro-batch without autograd.
    teacher_parts, student_parts, states = [], [], []
    trained_keys: set[str] = set()
    with torch.no_grad():
        for mb in micro_batches:
            teacher_parts.append(teacher(mb))
            embeds = dict(frozen(mb)) if frozen is not None else {}
            states.append(RngState.capture(device))
            trained = student(mb)
            if not isinstance(trained, Mapping):
                raise TypeError(f"exact accumulation needs the student's embeddings as a mapping of name -> tensor, "
                                f"got {type(trained).__name__}")
            overlap = sorted(set(embeds) & set(trained))
            if overlap:
                raise ValueError(f"the frozen towers' forward and the student's both returned {overlap}")
            trained_keys.update(trained)
            student_parts.append({**embeds, **trained})
    sizes = [{k: v.shape[0] for k, v in part.items()} for part in student_parts]
    teachers = _concat(teacher_parts, "teacher embeddings")
    # The trained embeddings of the whole group, as leaves: the loss's graph ends at them. The
    # frozen towers' stay constants, as in a plain step (gathered without a backward).
    leaves = {k: v.detach().requires_grad_(v.is_floating_point() and k in trained_keys)
              for k, v in _concat(student_parts, "student embeddings").items()}
    del student_parts, teacher_parts

    # 2. Every term on the whole group; 3. the gradient of the total w.r.t. the student's embeddings.
    with torch.enable_grad():
        total = loss(leaves, teachers)
        wrt = [k for k, v in leaves.items() if v.requires_grad]
        found = torch.autograd.grad(total, [leaves[k] for k in wrt], allow_unused=True) \
            if total.requires_grad and wrt else [None] * len(wrt)
    grads = {k: torch.zeros_like(leaves[k]) if g is None else g for k, g in zip(wrt, found)}
    if not torch.isfinite(total.detach()):
        if on_non_finite is None:
            raise FloatingPointError(f"the loss of the accumulation group is {total.item()}")
        # Skipped: no replay, so no gradient at all (a zero gradient pushed through a NaN
        # activation would still make NaN weight gradients).
        return on_non_finite(total).detach()
    reported = total.detach()
    del leaves, total

    # 4. Replay each micro-batch with autograd and push the cached gradients through it.
    per_micro = {k: torch.split(g, [s[k] for s in sizes]) for k, g in grads.items()}
    last = len(micro_batches) - 1
    for j, (mb, state) in enumerate(zip(micro_batches, states)):
        with (contextlib.nullcontext() if j == last else no_sync()), state.replay():
            embeds = student(mb)
            pairs = []
            for k, e in embeds.items():
                if not (torch.is_tensor(e) and e.requires_grad):
                    continue
                if k not in per_micro:
                    raise KeyError(f"the replayed forward returned {k!r}, which the first forward did not")
                pairs.append((e, per_micro[k][j]))
            if pairs:
                # d/dtheta sum <e(theta), g> = sum (de/dtheta)^T g: the cached gradient, through one
                # scalar so that backward() applies the Trainer's loss scaling. Outputs whose terms
                # give no gradient join with zeros: DDP expects a gradient for every parameter
                # its outputs depend on.
                surrogate = sum((e * g.to(e.dtype)).sum() for e, g in pairs)
                backward(surrogate)
    return reported


class ExactAccumulation:
    """Mixin for a :class:`~kd_trainer.distill.core.DistillationTrainer` subclass: its
    ``training_step`` computes each group's gradient with :func:`accumulate_exactly`, from the
    trainer's own hooks (``teacher_outputs``, ``student_outputs``, ``term_values``,
    ``_weighted_total``), so every term sees the whole group of ``exact_accumulation_steps``
    micro-batches.

    Place it before the trainer core: ``class RetrievalTrainer(ExactAccumulation,
    DistillationTrainer)``; ``exact_accumulation_steps=1`` (the default) leaves the Trainer's own
    step untouched. The DataLoader must yield the whole group
    (:func:`exact_group_arguments`).
    """

    # Which batch entry feeds each student tower (``image`` -> ``pixel_values``): with it, a
    # stage's frozen towers embed once, before the trained ones, and are not replayed. Without
    # it every tower is replayed (frozen ones without autograd, as in every step).
    tower_inputs: Mapping[str, str] = MappingProxyType({})

    def __init__(self, *args: Any, exact_accumulation_steps: int = 1, **kwargs: Any) -> None:
        if isinstance(exact_accumulation_steps, bool) or not isinstance(exact_accumulation_steps, int) \
                or exact_accumulation_steps < 1:
            raise ValueError(f"exact_accumulation_steps must be an integer >= 1, got {exact_accumulation_steps!r}")
        self.exact_accumulation_steps = exact_accumulation_steps
        super().__init__(*args, **kwargs)
        if exact_accumulation_steps > 1:
            self._check_exact_accumulation()

    def _check_exact_accumulation(self) -> None:
        k, args = self.exact_accumulation_steps, self.args
        check_exact_accumulation(self.mimic.jobs if self.mimic is not None else [])
        if args.gradient_accumulation_steps != 1:
            raise ValueError(f"exact accumulation splits each DataLoader batch into {k} micro-batches itself, so "
                             f"gradient_accumulation_steps must be 1 (got {args.gradient_accumulation_steps}); "
                             "exact_group_arguments() translates a recipe's training block")
        if args.auto_find_batch_size:
            raise ValueError("auto_find_batch_size would shrink the group, not the micro-batch; with "
                             "contrastive_accumulation: exact choose the micro-batch yourself "
                             "(per_device_train_batch_size) and raise gradient_accumulation_steps instead")
        if args.per_device_train_batch_size % k:
            raise ValueError(f"per_device_train_batch_size is the whole group of {k} micro-batches and must be a "
                             f"multiple of {k}, got {args.per_device_train_batch_size}")
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise ValueError("contrastive_accumulation: exact runs one backward per micro-batch and synchronises "
                             "gradients itself (DDP's no_sync); DeepSpeed steps its optimizer inside backward and "
                             "FSDP is untested with it: use DDP, or contrastive_accumulation: plain")
        if args.n_gpu > 1:
            raise ValueError("contrastive_accumulation: exact does not support torch.nn.DataParallel (several GPUs "
                             "in one process); launch one process per device (accelerate launch / torchrun)")

    @property
    def micro_batch_size(self) -> int:
        """``b``: the samples of one micro-batch (the group is ``exact_accumulation_steps * b``)."""
        return self.args.per_device_train_batch_size // self.exact_accumulation_steps

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        if self.exact_accumulation_steps == 1:
            return super().training_step(model, inputs, num_items_in_batch)  # type: ignore[misc]
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()  # schedule-free optimizers, as the Trainer's own step does
        inputs = self._prepare_inputs(inputs)
        stage = self.current_stage
        values: dict[str, torch.Tensor] = {}

        def loss(student: dict[str, torch.Tensor], teacher_embeds: dict[str, torch.Tensor]) -> torch.Tensor:
            values.update(self.term_values(inputs, student, teacher_embeds, stage))
            return self._weighted_total(values, {}, stage, record=True)

        frozen_inputs = {self.tower_inputs[t] for t in stage.frozen_towers if t in self.tower_inputs}
        trained_inputs = set(self.tower_inputs.values()) - frozen_inputs

        def without(names: set[str]) -> Callable[[Batch], Embeddings]:
            # A tower whose input is None is not run (the task's student_outputs skips it).
            return lambda mb: self.student_outputs(model, {**mb, **dict.fromkeys(names)}, stage)

        with self.compute_loss_context_manager():
            return accumulate_exactly(
                split_group(inputs, self.micro_batch_size),
                teacher=lambda mb: self.teacher_outputs(mb, stage),
                frozen=without(trained_inputs) if frozen_inputs else None,
                student=without(frozen_inputs),
                loss=loss,
                backward=self.accelerator.backward,
                no_sync=lambda: self.accelerator.no_sync(model),
                on_non_finite=lambda total: self._non_finite(total, values),
                device=self.accelerator.device,
            )
