"""Answering a sentence: the index's images ranked for a query, by the evaluation's ranking.

    searcher = Searcher(load_index("photos.index"), load_encoder(model_path))   # checks the model
    for hit in searcher.search(["a woman in a red coat with a black bag"], top=5)[0]:
        print(hit.rank, hit.score, hit.path)

The ranking is :class:`kd_trainer.evaluation.GalleryRanking`, the one ``kd-trainer eval`` scores:
cosine similarity, ties broken by index order. It is brute force, one matrix-vector product over the
stored embeddings per query; at 100k x 512 that reads 200 MB per query (``bench/bench_search.py``
measures it). Past a few hundred thousand images, or with many queries per second, an approximate
nearest-neighbour library (faiss, usearch) would take over; nothing here needs one yet.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from kd_trainer.evaluation import GalleryRanking
from kd_trainer.search.encoders import Encoder, is_onnx_export, load_encoder
from kd_trainer.search.errors import SearchIndexError
from kd_trainer.search.index import GalleryIndex, load_index

__all__ = ["Hit", "Searcher", "open_searcher"]


@dataclass(frozen=True)
class Hit:
    rank: int  # 1-based
    path: str  # relative to the gallery folder
    score: float  # cosine similarity
    file: Path  # the image on disk


class Searcher:
    """Queries against one index with the model that built it (refused otherwise, see
    :meth:`GalleryIndex.check_model`)."""

    def __init__(self, index: GalleryIndex, encoder: Encoder, *, gallery: str | Path | None = None):
        index.check_model(encoder)
        self.index = index
        self.encoder = encoder
        self.gallery = Path(gallery) if gallery is not None else index.gallery
        self.ranking = GalleryRanking(index.embeddings)

    def search(self, queries: Sequence[str], top: int = 10) -> list[list[Hit]]:
        """The first ``top`` images for each query, best first."""
        if not queries or any(not q.strip() for q in queries):
            raise SearchIndexError("each query must be a non-empty sentence, got " + repr(list(queries)))
        indices, scores = self.ranking.top_k(self.encoder.embed_texts(list(queries)), top)
        files = self.index.files
        return [[Hit(rank=r + 1, path=files[i].path, score=float(s), file=self.gallery / files[i].path)
                 for r, (i, s) in enumerate(zip(row.tolist(), srow.tolist()))]
                for row, srow in zip(indices, scores)]


def open_searcher(index_path: str | Path, *, model: str | Path | None = None, onnx_variant: str | None = None,
                  gallery: str | Path | None = None) -> Searcher:
    """The index at ``index_path``, checked against its gallery (``gallery``: where it is now, if it
    moved), with the model that built it (``model``: where it is now, if it moved; the ONNX variant
    defaults to the index's). Stale or foreign: :class:`~kd_trainer.search.errors.StaleIndexError`."""
    index = load_index(index_path)
    index.check_gallery(gallery)
    path = Path(model) if model is not None else Path(index.model["path"])
    if not path.exists():
        raise SearchIndexError(f"the model the index {str(index.path)!r} was built with, {str(path)!r}, is not "
                               "there any more; give its new place with --model")
    if onnx_variant is None and is_onnx_export(path):
        onnx_variant = index.model.get("variant")
    return Searcher(index, load_encoder(path, onnx_variant=onnx_variant), gallery=gallery)
