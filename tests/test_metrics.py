"""Retrieval metrics (``rank_metrics``) against rankings worked out by hand and a full-sort reference.

Features in these tests are built so that every cosine similarity is a dyadic fraction computed
exactly, whatever the summation order of the matrix product: then ties are real ties (not
rounding accidents), the order they are broken in is the only thing that decides the ranking,
and results can be compared across chunk sizes for exact equality.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
import torch.nn.functional as F

from kd_trainer import evaluation
from kd_trainer.evaluation import rank_metrics

# --------------------------------------------------------------------------------------------
# Building features with chosen similarities
# --------------------------------------------------------------------------------------------


def features_from_scores(scores: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Query and gallery features whose cosine similarity (i, j) is exactly ``scores[i][j] / 32``.

    Scores are even integers in [-16, 16]; at most 4 queries. Query i is the indicator of its own
    block of 16 dims (unit norm: entries 1/4); every gallery vector has 64 entries of +-1 (unit
    norm: entries +-1/8), with ``(16 - s) / 2`` minus signs in block i. The cosine is then
    ``(1/32) * (sum of the signs in block i) = s / 32``, a sum of multiples of 1/32: exact.
    """
    num_q, num_g = len(scores), len(scores[0])
    assert num_q <= 4
    q = torch.zeros(num_q, 64)
    g = torch.ones(num_g, 64)
    for i, row in enumerate(scores):
        q[i, 16 * i : 16 * (i + 1)] = 1.0
        for j, s in enumerate(row):
            assert s % 2 == 0 and -16 <= s <= 16
            g[j, 16 * i : 16 * i + (16 - s) // 2] = -1.0
    return q, g


def test_features_from_scores_gives_the_scores() -> None:
    scores = [[16, -16, 0, 6], [2, 2, -4, 10]]
    q, g = features_from_scores(scores)
    sims = F.normalize(q, dim=1) @ F.normalize(g, dim=1).T
    assert torch.equal(sims, torch.tensor(scores, dtype=torch.float32) / 32)


def metrics_for(scores, query_pids, gallery_pids, **kwargs) -> dict[str, float]:
    q, g = features_from_scores(scores)
    return rank_metrics(q, g, torch.tensor(query_pids), torch.tensor(gallery_pids), **kwargs)


# --------------------------------------------------------------------------------------------
# Rankings worked out by hand. Scores stand for similarities (score / 32).
# --------------------------------------------------------------------------------------------


def test_two_queries_without_ties() -> None:
    # gallery:          g0  g1  g2  g3  g4
    # gallery pids:      1   2   1   3   2
    #
    # query 0, pid 1, scores  4   8  -2   6   0
    #   ranking: g1 (8), g3 (6), g0 (4), g4 (0), g2 (-2)
    #   matches g0, g2 at ranks 3 and 5 (the hardest match is last of the whole gallery)
    #   R@1 = 0, R@5 = 1;  AP = (1/3 + 2/5) / 2 = 11/30;  INP = 2/5
    # query 1, pid 2, scores  2  10   0  -4   8
    #   ranking: g1 (10), g4 (8), g0 (2), g2 (0), g3 (-4)
    #   matches g1, g4 at ranks 1 and 2
    #   R@1 = 1, R@5 = 1;  AP = (1/1 + 2/2) / 2 = 1;  INP = 2/2 = 1
    #
    # mean: R@1 = 1/2, R@5 = R@10 = 1, mAP = (11/30 + 1)/2 = 41/60, mINP = (2/5 + 1)/2 = 7/10
    m = metrics_for([[4, 8, -2, 6, 0], [2, 10, 0, -4, 8]], [1, 2], [1, 2, 1, 3, 2])
    assert m == pytest.approx(
        {"r1": 50.0, "r5": 100.0, "r10": 100.0, "mAP": 100 * 41 / 60, "mINP": 100 * 7 / 10}
    )
    assert list(m) == ["r1", "r5", "r10", "mAP", "mINP"]


def test_ties_are_broken_by_gallery_order() -> None:
    # gallery:          g0  g1  g2  g3
    # gallery pids:      7   8   7   9
    #
    # query 0, pid 8, scores  6   6   6   2
    #   g0, g1, g2 tie; the lower gallery index goes first: ranking g0, g1, g2, g3
    #   match g1 at rank 2: the tie with g0 costs it R@1
    #   R@1 = 0, R@2 = 1, R@4 = 1;  AP = 1/2;  INP = 1/2
    # query 1, pid 7, same scores, same ranking
    #   matches g0, g2 at ranks 1 and 3: here the tie wins R@1
    #   R@1 = 1, R@2 = 1, R@4 = 1;  AP = (1/1 + 2/3) / 2 = 5/6;  INP = 2/3
    # query 2, pid 9, scores  0   0   0   0
    #   everything ties: ranking g0, g1, g2, g3; match g3 (last gallery item) at rank 4
    #   R@1 = 0, R@2 = 0, R@4 = 1;  AP = 1/4;  INP = 1/4
    #
    # mean: R@1 = 1/3, R@2 = 2/3, R@4 = 1,
    #       mAP = (1/2 + 5/6 + 1/4)/3 = 19/36, mINP = (1/2 + 2/3 + 1/4)/3 = 17/36
    m = metrics_for([[6, 6, 6, 2], [6, 6, 6, 2], [0, 0, 0, 0]], [8, 7, 9], [7, 8, 7, 9], ks=(1, 2, 4))
    assert m == pytest.approx(
        {"r1": 100 / 3, "r2": 200 / 3, "r4": 100.0, "mAP": 100 * 19 / 36, "mINP": 100 * 17 / 36}
    )


def test_matches_interleaved_with_ties_and_last_match_at_the_end() -> None:
    # gallery:          g0  g1  g2  g3  g4  g5
    # gallery pids:      1   2   1   2   2   1
    #
    # query 0, pid 1, scores  0   4   4   4   4  -6
    #   g1, g2, g3, g4 tie at 4 and keep gallery order: ranking g1, g2, g3, g4, g0, g5
    #   matches: g2 at rank 2 (behind the tied non-match g1, ahead of the tied g3 and g4),
    #            g0 at rank 5, g5 (the last gallery item) at rank 6, the last rank
    #   R@1 = 0, R@2 = 1, R@5 = 1;  AP = (1/2 + 2/5 + 3/6) / 3 = 7/15;  INP = 3/6 = 1/2
    m = metrics_for([[0, 4, 4, 4, 4, -6]], [1], [1, 2, 1, 2, 2, 1], ks=(1, 2, 5))
    assert m == pytest.approx({"r1": 0.0, "r2": 100.0, "r5": 100.0, "mAP": 100 * 7 / 15, "mINP": 50.0})


def test_every_query_first_scores_100() -> None:
    # Each query's matches are its top items: every AP and INP is 1.
    m = metrics_for([[8, 8, 0, -4], [0, -2, 6, 6]], [3, 5], [3, 3, 5, 5], ks=(1,))
    assert m == pytest.approx({"r1": 100.0, "mAP": 100.0, "mINP": 100.0})


# --------------------------------------------------------------------------------------------
# A straightforward reference: full stable sort of every row, IRRA's cumulative-count formulas
# --------------------------------------------------------------------------------------------


def reference_rank_metrics(
    query_feats: torch.Tensor,
    gallery_feats: torch.Tensor,
    query_pids: torch.Tensor,
    gallery_pids: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Rank the whole gallery for every query at once with a stable descending sort, then
    compute CMC, AP and INP from the match indicator in rank order, the way IRRA's code does."""
    q = F.normalize(query_feats.float(), dim=1)
    g = F.normalize(gallery_feats.float(), dim=1)
    order = torch.sort(q @ g.T, dim=1, descending=True, stable=True).indices
    matches = (gallery_pids[order] == query_pids[:, None]).double()  # Q x G, in rank order
    found = matches.cumsum(1)  # matches among the top r, for r = 1..G
    ranks = torch.arange(1, matches.shape[1] + 1, dtype=torch.float64)
    num_rel = matches.sum(1)
    out = {f"r{k}": 100 * float((found[:, min(k, matches.shape[1]) - 1] > 0).double().mean()) for k in ks}
    ap = (found / ranks * matches).sum(1) / num_rel
    hardest = (matches * ranks).max(1).values  # rank of the last match
    out["mAP"] = 100 * float(ap.mean())
    out["mINP"] = 100 * float((num_rel / hardest).mean())
    return out


def tied_features(n: int, nonzeros: int, generator: torch.Generator) -> torch.Tensor:
    """n vectors in 16 dims with ``nonzeros`` entries of +-1 (4 or 16, so the norm is 2 or 4 and
    normalised entries are +-1/2 or +-1/4): cosines are multiples of 1/4 or 1/8, exact, and
    many of them are equal."""
    out = torch.zeros(n, 16)
    for i in range(n):
        cols = torch.randperm(16, generator=generator)[:nonzeros]
        out[i, cols] = torch.randint(0, 2, (nonzeros,), generator=generator).float() * 2 - 1
    return out


def tied_problem(seed: int, nonzeros: int, num_q: int = 37, num_g: int = 53):
    gen = torch.Generator().manual_seed(seed)
    q = tied_features(num_q, nonzeros, gen)
    g = tied_features(num_g, nonzeros, gen)
    g_pids = torch.randint(0, 8, (num_g,), generator=gen)
    q_pids = g_pids[torch.randint(0, num_g, (num_q,), generator=gen)]  # every query has a match
    return q, g, q_pids, g_pids


def test_reference_agrees_with_a_hand_worked_case() -> None:
    q, g = features_from_scores([[0, 4, 4, 4, 4, -6]])
    want = reference_rank_metrics(q, g, torch.tensor([1]), torch.tensor([1, 2, 1, 2, 2, 1]), ks=(1, 2))
    assert want == pytest.approx({"r1": 0.0, "r2": 100.0, "mAP": 100 * 7 / 15, "mINP": 50.0})


@pytest.mark.parametrize("nonzeros", [4, 16])
@pytest.mark.parametrize("seed", range(4))
def test_agrees_with_reference_under_ties_for_every_chunk_size(seed: int, nonzeros: int) -> None:
    q, g, q_pids, g_pids = tied_problem(seed, nonzeros)
    ks = (1, 3, 5, 10, 100)
    want = reference_rank_metrics(q, g, q_pids, g_pids, ks)
    results = [rank_metrics(q, g, q_pids, g_pids, ks=ks, chunk_size=c) for c in (1, 3, 1000)]
    assert results[0] == pytest.approx(want, rel=1e-12, abs=1e-12)
    assert results[1] == results[0]
    assert results[2] == results[0]


def test_agrees_with_reference_on_a_wider_gallery_with_tie_counting_in_small_batches(monkeypatch) -> None:
    # Wide enough that several blocks of rows are sorted in parallel; the tie counter is made to
    # take one (query, match) pair per batch so its batching is exercised too.
    monkeypatch.setattr(evaluation, "_TIE_BATCH_ELEMENTS", 1)
    q, g, q_pids, g_pids = tied_problem(7, 4, num_q=30, num_g=700)
    want = reference_rank_metrics(q, g, q_pids, g_pids)
    assert rank_metrics(q, g, q_pids, g_pids, chunk_size=16) == pytest.approx(want, rel=1e-12, abs=1e-12)


def test_single_thread_gives_the_same_result() -> None:
    q, g, q_pids, g_pids = tied_problem(3, 16)
    want = rank_metrics(q, g, q_pids, g_pids)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert rank_metrics(q, g, q_pids, g_pids) == want
    finally:
        torch.set_num_threads(threads)


def test_blas_threads_are_limited_during_ranking_and_restored_after(monkeypatch) -> None:
    # Each worker runs its own single-threaded product; afterwards numpy's BLAS is as it was.
    from threadpoolctl import threadpool_info

    def blas_threads() -> list[int]:
        return [info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas"]

    before = blas_threads()
    assert before, "threadpoolctl finds no BLAS under numpy"
    seen = []
    product = evaluation._similarities_and_sorted_rows

    def spying(*args, **kwargs):
        seen.append(blas_threads())
        return product(*args, **kwargs)

    monkeypatch.setattr(evaluation, "_similarities_and_sorted_rows", spying)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        q, g, q_pids, g_pids = tied_problem(5, 4)
        want = reference_rank_metrics(q, g, q_pids, g_pids)
        assert rank_metrics(q, g, q_pids, g_pids, chunk_size=7) == pytest.approx(want, rel=1e-12, abs=1e-12)
    finally:
        torch.set_num_threads(threads)
    assert seen and all(all(n == 1 for n in s) for s in seen)
    assert blas_threads() == before


# --------------------------------------------------------------------------------------------
# Invariances
# --------------------------------------------------------------------------------------------


def test_permuting_the_queries_changes_nothing() -> None:
    q, g, q_pids, g_pids = tied_problem(11, 4)
    want = rank_metrics(q, g, q_pids, g_pids, chunk_size=5)
    perm = torch.randperm(q.shape[0], generator=torch.Generator().manual_seed(0))
    assert rank_metrics(q[perm], g, q_pids[perm], g_pids, chunk_size=5) == pytest.approx(want, rel=1e-12)


def test_scaling_the_features_changes_nothing() -> None:
    q, g, q_pids, g_pids = tied_problem(12, 16)
    want = rank_metrics(q, g, q_pids, g_pids)
    assert rank_metrics(q * 3.0, g * 0.25, q_pids, g_pids) == pytest.approx(want, rel=1e-12)


def test_any_float_dtype_is_accepted() -> None:
    # These features are exact in float64 and bfloat16 as well, so the result is the same.
    q, g, q_pids, g_pids = tied_problem(13, 4)
    want = rank_metrics(q, g, q_pids, g_pids)
    assert rank_metrics(q.double(), g.double(), q_pids, g_pids) == want
    assert rank_metrics(q.bfloat16(), g.bfloat16(), q_pids, g_pids) == want


# --------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------


def test_a_query_without_a_match_is_refused_with_its_index() -> None:
    q, g = torch.randn(4, 8), torch.randn(3, 8)
    with pytest.raises(ValueError, match=r"2 of 4 queries have no match in the gallery \(query indices 1, 3;"):
        rank_metrics(q, g, torch.tensor([0, 5, 1, 6]), torch.tensor([0, 1, 1]))


def test_an_empty_gallery_is_refused() -> None:
    with pytest.raises(ValueError, match="2 of 2 queries have no match"):
        rank_metrics(torch.randn(2, 8), torch.randn(0, 8), torch.tensor([0, 1]), torch.zeros(0, dtype=torch.long))


@pytest.mark.parametrize(
    ("q_shape", "g_shape", "num_q_pids", "num_g_pids", "named"),
    [
        ((2, 4), (3, 5), 2, 3, r"query_feats \(2, 4\), gallery_feats \(3, 5\)"),
        ((2, 4), (3, 4), 3, 3, r"query_feats \(2, 4\).*query_pids \(3,\)"),
        ((2, 4), (3, 4), 2, 2, r"gallery_feats \(3, 4\).*gallery_pids \(2,\)"),
        ((8,), (3, 8), 1, 3, r"query_feats \(8,\)"),
    ],
)
def test_mismatched_shapes_are_refused_naming_them(q_shape, g_shape, num_q_pids, num_g_pids, named) -> None:
    with pytest.raises(ValueError, match=named):
        rank_metrics(
            torch.randn(*q_shape),
            torch.randn(*g_shape),
            torch.zeros(num_q_pids, dtype=torch.long),
            torch.zeros(num_g_pids, dtype=torch.long),
        )


@pytest.mark.parametrize("kwargs", [{"ks": ()}, {"ks": (0, 5)}, {"chunk_size": 0}])
def test_bad_ks_or_chunk_size_are_refused(kwargs) -> None:
    q, g, q_pids, g_pids = tied_problem(0, 4)
    with pytest.raises(ValueError, match="ks|chunk_size"):
        rank_metrics(q, g, q_pids, g_pids, **kwargs)


def test_non_finite_features_are_refused() -> None:
    q, g, q_pids, g_pids = tied_problem(0, 4)
    g[5, 2] = float("nan")
    with pytest.raises(ValueError, match="gallery_feats contains NaN"):
        rank_metrics(q, g, q_pids, g_pids)


# --------------------------------------------------------------------------------------------
# The ranking listed (GalleryRanking / top_k): what search and retrieval galleries show
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("nonzeros", [4, 16])
@pytest.mark.parametrize("seed", range(3))
def test_top_k_lists_the_stable_descending_order_under_ties(seed: int, nonzeros: int) -> None:
    q, g, q_pids, g_pids = tied_problem(seed, nonzeros)
    sims = F.normalize(q, dim=1) @ F.normalize(g, dim=1).T
    want = torch.sort(sims, dim=1, descending=True, stable=True).indices
    ranking = evaluation.GalleryRanking(g)
    for k in (1, 5, 10, 53, 80):
        for chunk in (1, 7, 2048):
            idx, scores = ranking.top_k(q, k, chunk_size=chunk)
            assert torch.equal(idx, want[:, :min(k, g.shape[0])]), (k, chunk)
            assert torch.equal(scores, sims.gather(1, idx))


@pytest.mark.parametrize("nonzeros", [4, 16])
def test_top_k_is_the_ranking_rank_metrics_scores(nonzeros: int) -> None:
    # R@k counted from the listed top k equals rank_metrics' R@k, ties included: one ranking, two views.
    q, g, q_pids, g_pids = tied_problem(21, nonzeros, num_q=60, num_g=90)
    ks = (1, 2, 5, 10)
    idx, _ = evaluation.top_k(q, g, max(ks))
    hit = g_pids[idx] == q_pids[:, None]
    listed = {f"r{k}": 100.0 * int(hit[:, :k].any(1).sum()) / q.shape[0] for k in ks}
    scored = rank_metrics(q, g, q_pids, g_pids, ks=ks)
    assert listed == {key: scored[key] for key in listed}


def test_top_k_refuses_bad_input() -> None:
    q, g, _, _ = tied_problem(0, 4)
    ranking = evaluation.GalleryRanking(g)
    for k in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="k must be a positive int"):
            ranking.top_k(q, k)
    with pytest.raises(ValueError, match=r"query_feats must be \(queries >= 1, 16\).*got shape \(2, 8\)"):
        ranking.top_k(torch.randn(2, 8), 3)
    with pytest.raises(ValueError, match="non-empty 2-D"):
        evaluation.GalleryRanking(torch.zeros(0, 16))
    bad = g.clone()
    bad[3, 1] = float("inf")
    with pytest.raises(ValueError, match="gallery_feats contains NaN or infinite"):
        evaluation.GalleryRanking(bad)
