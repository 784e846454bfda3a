"""Search a folder of images with a sentence: embed the folder once (an index), then rank it for
any query with the model that built it.

    kd-trainer index MODEL --gallery DIR --out INDEX
    kd-trainer search INDEX "a woman in a red coat with a black bag" --top 5 [--html page.html]

One module per question: :mod:`.encoders` (which model embeds images and sentences, and its
fingerprint), :mod:`.index` (what an index holds; is it still true of its gallery and model),
:mod:`.query` (the ranked answer), :mod:`.errors` (one line each), :mod:`.page` (the answer as a self-contained HTML page).
"""

from kd_trainer.search.encoders import Encoder, OnnxEncoder, TorchEncoder, is_onnx_export, load_encoder
from kd_trainer.search.index import (
    IMAGE_EXTENSIONS,
    GalleryFile,
    GalleryIndex,
    build_index,
    gallery_images,
    load_index,
    scan_gallery,
)
from kd_trainer.search.errors import SearchIndexError, StaleIndexError
from kd_trainer.search.page import write_search_page
from kd_trainer.search.query import Hit, Searcher, open_searcher

__all__ = [
    "IMAGE_EXTENSIONS",
    "Encoder",
    "GalleryFile",
    "GalleryIndex",
    "Hit",
    "OnnxEncoder",
    "SearchIndexError",
    "Searcher",
    "StaleIndexError",
    "TorchEncoder",
    "build_index",
    "gallery_images",
    "is_onnx_export",
    "load_encoder",
    "load_index",
    "open_searcher",
    "scan_gallery",
    "write_search_page",
]
