"""How well does a model retrieve: text-to-image ranking metrics (docs/getting-started.md, "Evaluation protocol").

The top of this module holds the metrics alone, on embeddings already computed
(:func:`rank_metrics`), then the ranking they score, listed (:class:`GalleryRanking`, :func:`top_k`:
what a search or a retrieval gallery shows); helpers that run a model over a split to get those
embeddings come below.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_limits
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

__all__ = ["rank_metrics", "GalleryRanking", "top_k", "embed_dataset", "evaluate_retrieval", "format_metrics"]

# ============================================================================================
# Retrieval metrics (IRRA protocol)
# ============================================================================================

# Tied (row, match) pairs are counted in batches of at most this many similarity entries.
_TIE_BATCH_ELEMENTS = 1 << 22


@torch.no_grad()
def rank_metrics(
    query_feats: torch.Tensor,
    gallery_feats: torch.Tensor,
    query_pids: torch.Tensor,
    gallery_pids: torch.Tensor,
    *,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 2048,
) -> dict[str, float]:
    """R@k (CMC), mAP and mINP of ranking ``gallery_feats`` for each row of ``query_feats``, in %.

    Text-to-image: queries are caption embeddings ``(Q, D)``, the gallery is image embeddings
    ``(G, D)``. Both are L2-normalised here and the similarity is their dot product (cosine),
    computed in float32 on the CPU whatever the input dtype and device, so the numbers do not
    depend on where the model ran. Gallery item ``g`` matches query ``q`` when
    ``gallery_pids[g] == query_pids[q]``.

    Ranking: each query ranks the whole gallery by descending similarity. Ties are broken by
    gallery order, the lower index first, i.e. exactly the order of a *stable* descending sort
    (``torch.sort(sims, descending=True, stable=True)``). So the 1-based rank of gallery item
    ``p`` is ``1 + #{g : s_g > s_p} + #{g < p : s_g == s_p}``.

    With ``r_1 < ... < r_n`` the ranks of the query's ``n`` matches:

    - R@k = 1 if ``r_1 <= k`` else 0 (CMC at k);
    - AP = (1/n) * sum_j j / r_j;
    - INP = n / r_n (IRRA's mINP: matches over the rank of the hardest match);

    each averaged over queries and reported as a percentage under the keys ``"r{k}"`` (one per
    entry of ``ks``), ``"mAP"`` and ``"mINP"``.

    Cost: similarities are computed ``chunk_size`` queries at a time, so at most two
    ``chunk_size x G`` float32 buffers exist at once (330 MB for 2048 x 20,000). Each chunk is
    split into one block of rows per ``torch.get_num_threads()`` thread; each thread computes its
    block's product (numpy's BLAS, one thread each) and sorts the rows by value (numpy's
    vectorised sort). The matches' ranks are then read off by binary search; only a match whose
    similarity equals another item's needs the gallery-order count, an O(G) scan of its row.
    20,000 x 20,000 at D = 512 takes about 4.5 s on 2 CPU cores (``bench/bench_ranking.py``),
    about 60% of it the matrix product. Given the same similarities, the result does not depend
    on ``chunk_size`` (BLAS may round the product differently for differently shaped blocks,
    which can only matter between near-equal values).

    Raises ``ValueError`` when the shapes disagree, a feature is not finite, ``ks`` or
    ``chunk_size`` is not positive, or some query has no match in the gallery (its AP and INP
    would divide by zero; IRRA's code would produce NaN).
    """
    q, g, qp, gp = _checked_inputs(query_feats, gallery_feats, query_pids, gallery_pids)
    ks = _checked_ks(ks)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")

    first, n_match = _match_blocks(qp, gp)
    order = torch.argsort(gp, stable=True)  # gallery indices grouped by pid, as in _match_blocks
    num_q, num_g = q.shape[0], g.shape[0]
    # One padding width for all chunks, so every query's sums run over the same terms whatever
    # chunk_size is, and the metrics do not change with it even in the last bit.
    width = int(n_match.max())
    slots = torch.arange(width)

    q = F.normalize(q, dim=1)
    g = F.normalize(g, dim=1)
    rows = min(chunk_size, num_q)
    sims_buf = torch.empty(rows, num_g, dtype=torch.float32)
    sorted_buf = torch.empty(rows, num_g, dtype=torch.float32)
    q_np, g_t_np = q.numpy(), g.numpy().T

    best_rank = torch.empty(num_q, dtype=torch.int64)
    ap = torch.empty(num_q, dtype=torch.float64)
    inp = torch.empty(num_q, dtype=torch.float64)
    workers = max(1, torch.get_num_threads())
    with ThreadPoolExecutor(max_workers=workers) as pool, _one_blas_thread_per_worker(workers):
        for start in range(0, num_q, rows):
            stop = min(start + rows, num_q)
            c = stop - start
            sims, sorted_sims = sims_buf[:c], sorted_buf[:c]
            _similarities_and_sorted_rows(q_np[start:stop], g_t_np, sims, sorted_sims, pool, workers)
            n = n_match[start:stop]
            valid = slots < n[:, None]
            # Gallery index of each query's j-th match (padding slots point at a valid index and
            # are masked out below).
            pos = (first[start:stop, None] + slots).clamp_(max=num_g - 1)
            match_idx = order[pos]
            match_sims = sims.gather(1, match_idx)

            at_or_below = torch.searchsorted(sorted_sims, match_sims, right=True)
            ahead = num_g - at_or_below  # strictly greater similarity
            # The match itself sits at at_or_below - 1 in its sorted row; it ties with another
            # item exactly when the value just below that slot is equal too.
            just_below = sorted_sims.gather(1, (at_or_below - 2).clamp_(min=0))
            tied = valid & (at_or_below >= 2) & (just_below == match_sims)
            if bool(tied.any()):
                r, j = tied.nonzero(as_tuple=True)
                ahead[r, j] += _equal_before(sims, r, match_idx[r, j], match_sims[r, j])

            ranks = torch.where(valid, ahead + 1, num_g + 1)  # padding sorts after every match
            ranks = ranks.sort(dim=1).values
            j1 = (slots + 1).to(torch.float64)
            ap[start:stop] = torch.where(valid, j1 / ranks, 0.0).sum(1) / n
            hardest = ranks.gather(1, (n - 1)[:, None]).squeeze(1)
            inp[start:stop] = n.to(torch.float64) / hardest
            best_rank[start:stop] = ranks[:, 0]

    out = {f"r{k}": 100.0 * int((best_rank <= k).sum()) / num_q for k in ks}
    out["mAP"] = 100.0 * float(ap.mean())
    out["mINP"] = 100.0 * float(inp.mean())
    return out


def _checked_inputs(
    query_feats: torch.Tensor,
    gallery_feats: torch.Tensor,
    query_pids: torch.Tensor,
    gallery_pids: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shapes, dtypes and finiteness checked; features as CPU float32, pids as CPU int64."""
    qp = torch.as_tensor(query_pids)
    gp = torch.as_tensor(gallery_pids)
    q, g = torch.as_tensor(query_feats), torch.as_tensor(gallery_feats)
    shapes = (
        f"query_feats {tuple(q.shape)}, gallery_feats {tuple(g.shape)}, "
        f"query_pids {tuple(qp.shape)}, gallery_pids {tuple(gp.shape)}"
    )
    q, g = _checked_features(q, g, shapes)
    if qp.dim() != 1 or qp.shape[0] != q.shape[0]:
        raise ValueError(f"need one query pid per query row: got {shapes}")
    if gp.dim() != 1 or gp.shape[0] != g.shape[0]:
        raise ValueError(f"need one gallery pid per gallery row: got {shapes}")
    for name, t in (("query_pids", qp), ("gallery_pids", gp)):
        if t.is_floating_point() or t.is_complex():
            raise ValueError(f"{name} must hold integer ids, got dtype {t.dtype}")
    return q, g, qp.detach().to(device="cpu", dtype=torch.int64), gp.detach().to(device="cpu", dtype=torch.int64)


def _checked_features(query_feats: torch.Tensor, gallery_feats: torch.Tensor,
                      shapes: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Both 2-D, one width, floating, finite, at least one query; returned as CPU float32."""
    q = torch.as_tensor(query_feats)
    g = torch.as_tensor(gallery_feats)
    shapes = shapes or f"query_feats {tuple(q.shape)}, gallery_feats {tuple(g.shape)}"
    if q.dim() != 2 or g.dim() != 2:
        raise ValueError(f"features must be 2-D (items x dim); got {shapes}")
    if q.shape[1] != g.shape[1]:
        raise ValueError(
            f"query and gallery features differ in dimension ({q.shape[1]} vs {g.shape[1]}); got {shapes}"
        )
    if q.shape[0] == 0:
        raise ValueError(f"no queries: got {shapes}")
    return _checked_matrix("query_feats", q), _checked_matrix("gallery_feats", g)


def _checked_matrix(name: str, t: torch.Tensor) -> torch.Tensor:
    """A 2-D floating, finite tensor as CPU float32 (the caller checked the shape)."""
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor, got dtype {t.dtype}")
    t = t.detach().to(device="cpu", dtype=torch.float32)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return t


def _checked_ks(ks: Sequence[int]) -> list[int]:
    ks = list(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"ks must be a non-empty sequence of positive ints, got {ks!r}")
    return ks


def _match_blocks(query_pids: torch.Tensor, gallery_pids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each query, where its matches start in the pid-sorted gallery and how many there are.

    The matches of query ``i`` are ``argsort(gallery_pids, stable=True)[first[i] : first[i] + n[i]]``.
    Raises ``ValueError`` when some query has no match.
    """
    uniq, counts = torch.unique_consecutive(torch.sort(gallery_pids).values, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    if uniq.numel() == 0:
        found = torch.zeros_like(query_pids, dtype=torch.bool)
        slot = torch.zeros_like(query_pids)
    else:
        slot = torch.searchsorted(uniq, query_pids).clamp_(max=uniq.numel() - 1)
        found = uniq[slot] == query_pids
    if not bool(found.all()):
        missing = (~found).nonzero().flatten()
        shown = ", ".join(str(int(i)) for i in missing[:5])
        more = ", ..." if missing.numel() > 5 else ""
        raise ValueError(
            f"{missing.numel()} of {query_pids.numel()} queries have no match in the gallery "
            f"(query indices {shown}{more}; pids {', '.join(str(int(query_pids[i])) for i in missing[:5])}{more}); "
            "their AP and INP are undefined"
        )
    return starts[slot], counts[slot]


def _one_blas_thread_per_worker(workers: int) -> contextlib.AbstractContextManager:
    """numpy's BLAS limited to one thread while ``workers`` threads each run their own products.

    A multi-threaded BLAS call per chunk followed by a parallel sort is slower: BLAS's idle
    threads keep spinning on the cores the sort needs. One product per worker has no handover.
    """
    if workers == 1:
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def _similarities_and_sorted_rows(
    q: np.ndarray, g_t: np.ndarray, sims: torch.Tensor, sorted_sims: torch.Tensor,
    pool: ThreadPoolExecutor, workers: int,
) -> None:
    """``sims`` := ``q @ g_t`` and ``sorted_sims`` := each row of it sorted ascending.

    The rows are split into one block per worker; each worker computes its block's product
    (numpy's BLAS, one thread each) and sorts a copy of it (numpy's vectorised sort, much faster
    than ``torch.sort``, which also builds indices we do not need). Both release the GIL. The
    unsorted product is kept: a match tied with another item needs the gallery order of the tie.
    """
    a, b = sims.numpy(), sorted_sims.numpy()

    def block(lo: int, hi: int) -> None:
        np.matmul(q[lo:hi], g_t, out=a[lo:hi])
        np.copyto(b[lo:hi], a[lo:hi])
        b[lo:hi].sort(axis=1)

    n = a.shape[0]
    if workers == 1 or n < 2:
        block(0, n)
    else:
        step = -(-n // workers)
        list(pool.map(lambda lo: block(lo, min(lo + step, n)), range(0, n, step)))


def _equal_before(sims: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
    """``#{g < cols[i] : sims[rows[i], g] == vals[i]}`` for each i: the ties ranked ahead of a match."""
    num_g = sims.shape[1]
    gallery_index = torch.arange(num_g)
    out = torch.empty(rows.numel(), dtype=torch.int64)
    step = max(1, _TIE_BATCH_ELEMENTS // num_g)
    for lo in range(0, rows.numel(), step):
        hi = lo + step
        same = sims[rows[lo:hi]] == vals[lo:hi, None]
        same &= gallery_index < cols[lo:hi, None]
        out[lo:hi] = same.sum(1)
    return out


# ============================================================================================
# The ranking itself: each query's first k gallery items
# ============================================================================================
class GalleryRanking:
    """Each query's gallery items in rank order: the ranking :func:`rank_metrics` scores, listed.

    The gallery is normalised once here, so a gallery built once (a search index) serves any number
    of queries. The ranking is :func:`rank_metrics`'s: cosine similarity in float32 on the CPU,
    descending, ties broken by gallery order (the lower index first).

    Cost per query: one pass over the ``G x D`` float32 gallery (a matrix-vector product, memory
    bound: about 200 MB at 100k x 512) and a partial sort (``np.partition``) of ``G`` values.
    """

    def __init__(self, gallery_feats: torch.Tensor):
        g = torch.as_tensor(gallery_feats)
        if g.dim() != 2 or g.shape[0] == 0:
            raise ValueError(f"gallery_feats must be a non-empty 2-D tensor (items x dim), got shape {tuple(g.shape)}")
        self.gallery = F.normalize(_checked_matrix("gallery_feats", g), dim=1)
        self._gallery_t = self.gallery.numpy().T  # a view: BLAS reads it transposed, nothing copied

    def __len__(self) -> int:
        return self.gallery.shape[0]

    @torch.no_grad()
    def top_k(self, query_feats: torch.Tensor, k: int, *, chunk_size: int = 2048,
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(indices, similarities)``, both ``(Q, min(k, G))``: row ``q`` holds the gallery indices of
        query ``q``'s first ``k`` ranks and their cosine similarities, rank 1 first."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        q = torch.as_tensor(query_feats)
        if q.dim() != 2 or q.shape[0] == 0 or q.shape[1] != self.gallery.shape[1]:
            raise ValueError(f"query_feats must be (queries >= 1, {self.gallery.shape[1]}) like the gallery's "
                             f"width, got shape {tuple(q.shape)}")
        # The gallery was checked once, when it was built; a query pass must not re-read it.
        q_np = F.normalize(_checked_matrix("query_feats", q), dim=1).numpy()
        num_g = len(self)
        k = min(k, num_g)
        indices = np.empty((q_np.shape[0], k), dtype=np.int64)
        scores = np.empty((q_np.shape[0], k), dtype=np.float32)
        for start in range(0, q_np.shape[0], chunk_size):
            sims = np.matmul(q_np[start:start + chunk_size], self._gallery_t)
            # The k-th largest value of each row; every item at or above it is a candidate (ties at the
            # k-th place included), ordered by a stable sort so equal values keep gallery order.
            kth = np.partition(sims, num_g - k, axis=1)[:, num_g - k]
            for r, row in enumerate(sims):
                cand = np.flatnonzero(row >= kth[r])
                top = cand[np.argsort(-row[cand], kind="stable")[:k]]
                indices[start + r], scores[start + r] = top, row[top]
        return torch.from_numpy(indices), torch.from_numpy(scores)


def top_k(query_feats: torch.Tensor, gallery_feats: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``GalleryRanking(gallery_feats).top_k(query_feats, k)``: each query's first ``k`` gallery indices
    and similarities, in the order :func:`rank_metrics` ranks them."""
    return GalleryRanking(gallery_feats).top_k(query_feats, k)


# ============================================================================================
# Running models over a split
# ============================================================================================
@torch.no_grad()
def embed_dataset(
    encode: Callable[[torch.Tensor], torch.Tensor],
    dataset: Any,
    input_key: str,
    *,
    device: torch.device,
    batch_size: int = 64,
    collate_fn: Callable | None = None,
    accelerator: Any = None,
    num_workers: int = 0,
    desc: str = "embedding",
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embed every item of ``dataset`` (``input_key`` -> ``encode``), with its pid.

    With an ``accelerator`` the items are sharded over processes and gathered back with
    ``gather_for_metrics``, which drops the padding added to even out the last batch, so
    every item appears exactly once, in dataset order.
    """
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn,
                        num_workers=num_workers)
    if accelerator is not None:
        loader = accelerator.prepare_data_loader(loader)
    show = (accelerator is None or accelerator.is_local_main_process) and progress
    feats, pids = [], []
    for batch in tqdm(loader, desc=desc, disable=not show, leave=False):
        emb = encode(batch[input_key].to(device)).float()
        pid = batch["pids"].to(device)
        if accelerator is not None:
            emb, pid = accelerator.gather_for_metrics((emb, pid))
        feats.append(emb.cpu())
        pids.append(pid.cpu())
    if accelerator is not None and loader in getattr(accelerator, "_dataloaders", []):
        accelerator._dataloaders.remove(loader)  # prepared per evaluation; don't let them pile up
    return torch.cat(feats), torch.cat(pids)


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def evaluate_retrieval(
    image_model: Any,
    gallery: Any,
    queries: Any,
    *,
    text_model: Any = None,
    batch_size: int = 64,
    collate_fn: Callable | None = None,
    accelerator: Any = None,
    num_workers: int = 0,
    chunk_size: int = 2048,
    progress: bool = True,
) -> dict[str, float]:
    """Text-to-image retrieval metrics of a dual encoder on one split (IRRA protocol).

    ``text_model`` defaults to ``image_model``; giving another model evaluates a hybrid
    pairing (e.g. student image tower with teacher text tower). Both need
    ``encode_image``/``encode_text`` returning embeddings (normalised here regardless).
    """
    text_model = image_model if text_model is None else text_model
    modes = [(m, m.training) for m in {id(image_model): image_model, id(text_model): text_model}.values()]
    for m, _ in modes:
        m.eval()
    try:
        autocast = accelerator.autocast() if accelerator is not None else contextlib.nullcontext()
        with autocast:
            g_feats, g_pids = embed_dataset(image_model.encode_image, gallery, "pixel_values",
                                            device=_model_device(image_model), batch_size=batch_size,
                                            collate_fn=collate_fn, accelerator=accelerator,
                                            num_workers=num_workers, desc="gallery", progress=progress)
            q_feats, q_pids = embed_dataset(text_model.encode_text, queries, "input_ids",
                                            device=_model_device(text_model), batch_size=batch_size,
                                            collate_fn=collate_fn, accelerator=accelerator,
                                            num_workers=num_workers, desc="queries", progress=progress)
    finally:
        for m, was_training in modes:
            m.train(was_training)
    return rank_metrics(q_feats, g_feats, q_pids, g_pids, chunk_size=chunk_size)


def format_metrics(rows: dict[str, dict[str, float]]) -> str:
    """A Markdown table, one row per model: R@1, R@5, R@10, mAP, mINP (in %)."""
    cols = ["r1", "r5", "r10", "mAP", "mINP"]
    heads = ["R@1", "R@5", "R@10", "mAP", "mINP"]
    width = max([len("model")] + [len(k) for k in rows])
    lines = [f"| {'model':<{width}} | " + " | ".join(f"{h:>6}" for h in heads) + " |",
             f"|{'-' * (width + 2)}|" + "|".join("-" * 8 for _ in heads) + "|"]
    for name, m in rows.items():
        lines.append(f"| {name:<{width}} | " + " | ".join(f"{m[c]:6.2f}" for c in cols) + " |")
    return "\n".join(lines)
