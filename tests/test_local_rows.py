"""Local rows in one process: the maths of splitting a batch-dependent term by rows (losses/rows.py).

The distributed proof is ``tests/test_gather.py``; here, without processes: rows that cover the
whole batch are the full computation; shards that partition the rows average to the full value
and gradient; one row checks against a hand computation; and local rows do ``1/N`` of the
matrix products, which is the point.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from kd_trainer.losses import TERMS, Features, LocalRows, compute_term

EMBEDDINGS = ("student_image", "student_text", "teacher_image", "teacher_text")
BATCH_DEPENDENT = sorted(n for n, s in TERMS.items() if s.batch_dependent)
CASES = [(n, side) for n in sorted(TERMS) for side in TERMS[n].sides]


def features(b: int = 7, d: int = 5, seed: int = 0, rows: LocalRows | None = None) -> Features:
    g = torch.Generator().manual_seed(seed)
    embeddings = {t: (torch.randn(b, d, generator=g, dtype=torch.float64) * 3).requires_grad_() for t in EMBEDDINGS}
    return Features(**embeddings, pids=torch.tensor([i // 2 for i in range(b)]), rows=rows)


def value_and_grads(name: str, side: str, f: Features) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The term and its gradient with respect to every input embedding (teachers get none: zeros)."""
    value = compute_term(name, f, temperature=0.3, side=side)
    inputs = [getattr(f, t) for t in EMBEDDINGS]
    grads = torch.autograd.grad(value, inputs, allow_unused=True)
    return value.detach(), [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]


# Terms that compute every row on every process, because they need a statistic of the whole batch
# beyond its columns (spec local_rows=False): none. The per-sample fd computes its own rows of a
# gathered batch too, which keeps it exact for uneven shards.
WHOLE_BATCH: set[str] = set()


def test_every_term_but_the_whole_batch_ones_declares_local_rows():
    assert {n for n, s in TERMS.items() if not s.local_rows} == WHOLE_BATCH
    assert {n for n, s in TERMS.items() if not s.batch_dependent} == {"fd"}


@pytest.mark.parametrize("name,side", CASES)
def test_rows_covering_the_batch_are_the_full_computation(name: str, side: str):
    full = features()
    everything = dataclasses.replace(full, rows=LocalRows(0, 7, 7, 1))
    want, want_grads = value_and_grads(name, side, full)
    got, grads = value_and_grads(name, side, everything)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name,side", CASES)
def test_shards_average_to_the_full_value_and_gradient(name: str, side: str):
    # Four shards of 3, 0, 1 and 3 rows: each value is its rows' share of the mean times 4.
    bounds = [(0, 3), (3, 3), (3, 4), (4, 7)]
    full = features(seed=1)
    want, want_grads = value_and_grads(name, side, full)
    shards = [value_and_grads(name, side, dataclasses.replace(full, rows=LocalRows(a, b, 7, 4))) for a, b in bounds]
    torch.testing.assert_close(sum(v for v, _ in shards) / 4, want, rtol=1e-10, atol=1e-12)
    for i, w in enumerate(want_grads):
        torch.testing.assert_close(sum(g[i] for _, g in shards) / 4, w, rtol=1e-10, atol=1e-12)
    # The shards are not each the full value (the term really computes its own rows).
    assert not torch.isclose(shards[0][0], want, rtol=1e-6)


def test_one_row_of_itc_by_hand():
    # The 2x2 case of test_losses.test_hand_itc: vs ts^T = [[1, .6], [0, .8]] at tau = 1.
    # Row 1 alone, of 2 shards: image->text row 1 has logits (0, .8); text->image row 1 (.6, .8).
    f = Features(student_image=torch.tensor([[2.0, 0.0], [0.0, 3.0]], dtype=torch.float64),
                 student_text=torch.tensor([[5.0, 0.0], [3.0, 4.0]], dtype=torch.float64),
                 rows=LocalRows(1, 2, 2, 2))
    i2t, t2i = math.log(1 + math.exp(-0.8)), math.log(1 + math.exp(-0.2))
    want = 2 / 2 * (i2t + t2i) / 2  # shards / total * row sum, for each CE; then their mean
    assert compute_term("itc", f, temperature=1.0).item() == pytest.approx(want, rel=1e-12)


def test_one_row_of_intra_ss_sd_by_hand():
    # vs vs^T = [[1, .6], [.6, 1]] against vt vt^T = I: row 0 has squared errors 0 and .36.
    f = Features(student_image=torch.tensor([[1.0, 0.0], [0.6, 0.8]], dtype=torch.float64),
                 teacher_image=torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64),
                 rows=LocalRows(0, 1, 2, 2))
    want = 2 / 2 * (0 + 0.36) / 2  # shards / total * (row 0's mean over its 2 columns)
    assert compute_term("intra_ss_sd", f, side="image").item() == pytest.approx(want, rel=1e-12)


def test_one_row_of_sdm_reads_its_own_pid_against_all():
    # Row 1 (pid 7) matches columns 0 and 1 (pids 7, 7) and not column 2 (pid 3).
    v = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], dtype=torch.float64)
    f = Features(student_image=v, student_text=v, pids=torch.tensor([7, 7, 3]), rows=LocalRows(1, 2, 3, 1))
    logits = v[1] @ v.T  # the same for both directions (vs = ts)
    prob = torch.softmax(logits, dim=0).tolist()
    q = [0.5, 0.5, 0.0]
    row = sum(p_ * (math.log(p_) - math.log(q_ + 1e-8)) for p_, q_ in zip(prob, q))
    assert compute_term("sdm", f, temperature=1.0).item() == pytest.approx(2 * row / 3, rel=1e-12)


@pytest.mark.parametrize("name", BATCH_DEPENDENT)
def test_local_rows_do_a_quarter_of_the_matrix_products(name: str):
    full = features(b=16, d=8)

    def flops(f: Features) -> int:
        with FlopCounterMode(display=False) as counter:
            compute_term(name, f).backward()
        return counter.get_total_flops()

    whole = flops(full)
    quarter = flops(dataclasses.replace(features(b=16, d=8), rows=LocalRows(4, 8, 16, 4)))
    assert whole > 0 and quarter == whole // 4


def test_bad_rows_are_refused():
    with pytest.raises(ValueError, match="0 <= start <= stop <= total"):
        LocalRows(3, 2, 8, 2)
    with pytest.raises(ValueError, match="shards >= 1"):
        LocalRows(0, 2, 8, 0)
    f = features(b=7, rows=LocalRows(0, 4, 8, 2))
    with pytest.raises(ValueError, match=r"rows of a batch of 8\), but the embeddings hold 7 samples"):
        compute_term("itc", f)
