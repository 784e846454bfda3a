"""The search results as one self-contained HTML page: each query, its ranked images with scores.

Images are embedded as ``data:`` URIs (JPEG thumbnails at most :data:`THUMB_HEIGHT` pixels high), so
the page shows the same thing wherever it is opened or copied to and loads nothing from the network.
"""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path
from typing import Sequence

from PIL import Image

from kd_trainer.data import open_image
from kd_trainer.search.query import Hit

__all__ = ["THUMB_HEIGHT", "write_search_page"]

THUMB_HEIGHT = 256

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
section { margin-bottom: 2em; }
h2 { font-size: 1.1em; font-weight: 600; }
ol.hits { display: flex; flex-wrap: wrap; gap: 12px; list-style: none; padding: 0; }
ol.hits li { text-align: center; font-size: 0.8em; max-width: 160px; word-break: break-all; }
ol.hits img { height: 192px; border: 1px solid #ccc; display: block; margin: 0 auto 4px; }
.meta { color: #666; font-size: 0.85em; }
"""


def _thumbnail(path: Path) -> str:
    image = open_image(path, "gallery")
    if image.height > THUMB_HEIGHT:
        image = image.resize((max(1, round(image.width * THUMB_HEIGHT / image.height)), THUMB_HEIGHT),
                             Image.BILINEAR)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def write_search_page(out: str | os.PathLike, queries: Sequence[str], hits: Sequence[Sequence[Hit]], *,
                      index_path: str, model: str, gallery: str) -> Path:
    """Write the page for ``queries`` and their ``hits`` (as :meth:`Searcher.search` returns them)."""
    esc = html.escape
    sections = []
    for query, row in zip(queries, hits):
        items = "\n".join(
            f'<li class="hit" data-rank="{h.rank}" data-path="{esc(h.path)}" data-score="{h.score:.6f}">'
            f'<img src="{_thumbnail(h.file)}" alt="{esc(h.path)}"><b>{h.rank}</b> · {h.score:.4f}<br>{esc(h.path)}</li>'
            for h in row)
        sections.append(f'<section class="query"><h2>{esc(query)}</h2>\n<ol class="hits">\n{items}\n</ol></section>')
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>kd-trainer search</title>'
            f"<style>{_STYLE}</style></head><body>\n<h1>Search results</h1>\n"
            f'<p class="meta">index {esc(index_path)} · model {esc(model)} · gallery {esc(gallery)}; '
            "score = cosine similarity of the caption and image embeddings</p>\n"
            + "\n".join(sections) + "\n</body></html>\n")
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
