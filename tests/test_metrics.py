"""Retrieval metrics against rankings worked out by hand, ties included, and a sort-based reference."""

from __future__ import annotations

import math

import pytest
import torch

from kd_trainer.evaluation import rank_metrics


def feats_for_sims(sims: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Query/gallery features whose cosine similarities are exactly ``sims``-ordered.

    Gallery item g is the unit vector at angle a_g; a query at angle 0 sees cos(a_g), so a
    larger given similarity gives a larger cosine, and equal ones give exactly equal cosines.
    One 2-D plane per query keeps queries independent.
    """
    q, g = len(sims), len(sims[0])
    qf = torch.zeros(q, 2 * q, dtype=torch.float64)
    gf = torch.zeros(g, 2 * q, dtype=torch.float64)
    for i, row in enumerate(sims):
        qf[i, 2 * i] = 1.0
        for j, s in enumerate(row):
            gf[j, 2 * i] = s
            gf[j, 2 * i + 1] = math.sqrt(max(0.0, 1.0 - s * s))
    # Unnormalised gallery rows mix planes; compare the planes separately instead.
    return qf, gf


def metrics_per_query(sims, q_pids, g_pids, **kw):
    """Metrics averaged over queries evaluated one at a time (each with its own plane)."""
    out = []
    for i, row in enumerate(sims):
        qf, gf = feats_for_sims([row])
        out.append(rank_metrics(qf, gf, torch.tensor([q_pids[i]]), torch.tensor(g_pids), **kw))
    return {k: sum(m[k] for m in out) / len(out) for k in out[0]}


def test_hand_worked_two_queries():
    # Gallery pids:        g0=1  g1=2  g2=1  g3=3  g4=2
    # Query A (pid 1) sims: .9   .8    .1    .7    .2  -> order g0 g1 g3 g4 g2; matches g0 (rank 1), g2 (rank 5)
    #   R@1 = 1, R@5 = 1; AP = (1/1 + 2/5)/2 = 0.7; INP = 2/5 = 0.4
    # Query B (pid 2) sims: .3   .2    .9    .8    .6  -> order g2 g3 g4 g0 g1; matches g4 (rank 3), g1 (rank 5)
    #   R@1 = 0, R@5 = 1; AP = (1/3 + 2/5)/2 = 11/30; INP = 2/5 = 0.4
    g_pids = [1, 2, 1, 3, 2]
    sims = [[0.9, 0.8, 0.1, 0.7, 0.2], [0.3, 0.2, 0.9, 0.8, 0.6]]
    m = metrics_per_query(sims, [1, 2], g_pids, ks=(1, 5))
    assert m["r1"] == pytest.approx(50.0)
    assert m["r5"] == pytest.approx(100.0)
    assert m["mAP"] == pytest.approx(100 * (0.7 + 11 / 30) / 2)
    assert m["mINP"] == pytest.approx(40.0)


def test_ties_are_broken_by_gallery_order():
    # Query pid 7; g0 (pid 5) and g1 (pid 7) tie at .5, everything else lower.
    # Stable order: g0 (rank 1), g1 (rank 2) -> R@1 = 0, AP = 1/2, INP = 1/2.
    m = metrics_per_query([[0.5, 0.5, 0.1]], [7], [5, 7, 9], ks=(1, 2))
    assert (m["r1"], m["r2"], m["mAP"], m["mINP"]) == pytest.approx((0.0, 100.0, 50.0, 50.0))
    # Swap the gallery order: now the match comes first among the tied pair -> R@1 = 1, AP = 1.
    m = metrics_per_query([[0.5, 0.5, 0.1]], [7], [7, 5, 9], ks=(1, 2))
    assert (m["r1"], m["mAP"], m["mINP"]) == pytest.approx((100.0, 100.0, 100.0))


def test_two_tied_matches_and_a_tied_distractor():
    # pids: g0=4 g1=1 g2=4 g3=4; sims .6 .6 .6 .2 for a query of pid 4.
    # Stable order: g0 (1, match) g1 (2) g2 (3, match) g3 (4, match)
    # AP = (1/1 + 2/3 + 3/4)/3 = 29/36; INP = 3/4; R@1 = 1.
    m = metrics_per_query([[0.6, 0.6, 0.6, 0.2]], [4], [4, 1, 4, 4], ks=(1,))
    assert m["r1"] == pytest.approx(100.0)
    assert m["mAP"] == pytest.approx(100 * 29 / 36)
    assert m["mINP"] == pytest.approx(75.0)


def test_last_match_at_the_end_of_the_gallery():
    # Query pid 2, only match g3 has the lowest similarity: rank 4 of 4.
    # R@1 = R@3 = 0; AP = 1/4; INP = 1/4.
    m = metrics_per_query([[0.9, 0.8, 0.7, -0.5]], [2], [1, 3, 1, 2], ks=(1, 3))
    assert (m["r1"], m["r3"], m["mAP"], m["mINP"]) == pytest.approx((0.0, 0.0, 25.0, 25.0))


def reference_metrics(q, g, q_pids, g_pids, ks=(1, 5, 10)):
    """The obvious way (IRRA's): a full stable sort of every row, then cumulative counts."""
    q = torch.nn.functional.normalize(q.float(), dim=-1)
    g = torch.nn.functional.normalize(g.float(), dim=-1)
    order = torch.sort(q @ g.T, dim=1, descending=True, stable=True).indices
    matches = (g_pids[order] == q_pids[:, None]).double()
    hits = matches.cumsum(1)
    out = {f"r{k}": 100 * float((hits[:, k - 1] > 0).double().mean()) for k in ks}
    pos = torch.arange(1, matches.shape[1] + 1, dtype=torch.float64)
    ap = (hits / pos * matches).sum(1) / matches.sum(1)
    last = torch.stack([row.nonzero().max() + 1 for row in matches]).double()
    out["mAP"] = 100 * float(ap.mean())
    out["mINP"] = 100 * float((matches.sum(1) / last).mean())
    return out


def exact_tie_features(n: int, dim: int = 8) -> torch.Tensor:
    """Vectors of four +-1 entries: normalised entries are exactly +-0.5, so every cosine is a
    multiple of 0.25 computed exactly in any summation order, and exact ties are everywhere."""
    out = torch.zeros(n, dim)
    for i in range(n):
        cols = torch.randperm(dim)[:4]
        out[i, cols] = torch.randint(0, 2, (4,)).float() * 2 - 1
    return out


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_matches_sort_reference_with_many_ties(seed, chunk):
    torch.manual_seed(seed)
    g, q = exact_tie_features(60), exact_tie_features(45)
    g_pids = torch.randint(0, 9, (60,))
    q_pids = g_pids[torch.randint(0, 60, (45,))]
    got = rank_metrics(q, g, q_pids, g_pids, chunk_size=chunk)
    want = reference_metrics(q, g, q_pids, g_pids)
    assert got == pytest.approx(want, abs=1e-9)


def test_matches_reference_on_continuous_features_and_is_invariant():
    torch.manual_seed(0)
    g, q = torch.randn(300, 16), torch.randn(200, 16)
    g_pids = torch.arange(300) // 4
    q_pids = g_pids[torch.randint(0, 300, (200,))]
    got = rank_metrics(q, g, q_pids, g_pids, chunk_size=64)
    assert got == pytest.approx(reference_metrics(q, g, q_pids, g_pids), abs=1e-9)
    perm = torch.randperm(200)
    assert rank_metrics(q[perm] * 3.0, g * 0.5, q_pids[perm], g_pids) == pytest.approx(got, abs=1e-9)


def test_perfect_retrieval_scores_100():
    g = torch.eye(6)
    g_pids = torch.tensor([0, 0, 1, 1, 2, 2])
    q = g[[0, 2, 4]] + g[[1, 3, 5]]  # each query equally close to both images of its pid
    m = rank_metrics(q, g, torch.tensor([0, 1, 2]), g_pids)
    assert m == pytest.approx({"r1": 100.0, "r5": 100.0, "r10": 100.0, "mAP": 100.0, "mINP": 100.0})


def test_query_without_match_is_refused():
    with pytest.raises(ValueError, match="1 queries have no matching image"):
        rank_metrics(torch.randn(2, 4), torch.randn(3, 4), torch.tensor([0, 9]), torch.tensor([0, 1, 2]))


@pytest.mark.parametrize(
    "shapes",
    [((2, 4), (3, 5), 2, 3), ((2, 4), (3, 4), 3, 3), ((2, 4), (3, 4), 2, 2)],
)
def test_shape_mismatches_are_named(shapes):
    qs, gs, nq, ng = shapes
    with pytest.raises(ValueError, match=r"\("):
        rank_metrics(torch.randn(*qs), torch.randn(*gs), torch.zeros(nq, dtype=torch.long),
                     torch.zeros(ng, dtype=torch.long))
