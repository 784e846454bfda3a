"""What a search index holds, and whether it still describes its gallery and its model.

    index = build_index(encoder, "photos/", "photos.index")   # embeds every image once
    index = load_index("photos.index")
    index.check_gallery()                                      # StaleIndexError: files added/removed/changed
    index.check_model(encoder)                                 # StaleIndexError: another model

An index is a folder:

* ``index.json``: the format, the model (path, kind, ONNX variant, fingerprint, embedding width), the
  gallery folder and its files in index order, each with its size and modification time (ns);
* ``embeddings.npy``: ``(N, D)`` float32, row ``i`` the image tower's output for file ``i`` (as the
  model returns it; the ranking normalises).

It is written into a temporary sibling folder and renamed into place, so an interrupted build leaves
no half index. Files are the images directly or in sub-folders of the gallery (by extension, case
ignored; hidden files and folders skipped), in sorted relative-path order, which is also the order
ties are broken in.

Why sizes and modification times and not content hashes: checking an index before each search must
not read the whole gallery again; a copy that keeps neither (``cp`` without ``-p``) reads as changed,
which errs on the safe side.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kd_trainer.data.images import find_unreadable
from kd_trainer.search.encoders import Encoder
from kd_trainer.search.errors import SearchIndexError, StaleIndexError

__all__ = ["EMBEDDINGS_FILE", "IMAGE_EXTENSIONS", "INDEX_FILE", "INDEX_FORMAT", "GalleryFile", "GalleryIndex",
           "SearchIndexError", "StaleIndexError", "build_index", "gallery_images", "load_index", "scan_gallery"]

INDEX_FILE = "index.json"
EMBEDDINGS_FILE = "embeddings.npy"
INDEX_FORMAT = "kd_trainer-search-index/1"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
_SHOWN = 5  # file names listed in a message before "..."


@dataclass(frozen=True)
class GalleryFile:
    path: str  # relative to the gallery folder, "/"-separated
    size: int
    mtime_ns: int


def scan_gallery(folder: str | os.PathLike) -> list[GalleryFile]:
    """The gallery's image files, sorted by relative path, with their sizes and modification times."""
    root = Path(folder)
    if not root.is_dir():
        raise SearchIndexError(f"gallery {str(folder)!r} is not a folder; expected a folder of images")
    found = []
    for here, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if name.startswith(".") or not name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            full = Path(here) / name
            st = full.stat()
            found.append(GalleryFile(full.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns))
    return sorted(found, key=lambda f: f.path)


def gallery_images(folder: str | os.PathLike) -> list[GalleryFile]:
    """:func:`scan_gallery`, refusing a folder with no images (:class:`SearchIndexError`): what an index
    can be built from. Cheap (no image is read), so ``kd-trainer index`` checks it before loading a model."""
    files = scan_gallery(folder)
    if not files:
        raise SearchIndexError(f"gallery {str(folder)!r} has no images; expected files ending in "
                               f"{', '.join(IMAGE_EXTENSIONS)} (in it or its sub-folders)")
    return files


def _listed(names: list[str]) -> str:
    return ", ".join(names[:_SHOWN]) + (", ..." if len(names) > _SHOWN else "")


def _files_were(names: list[str], what: str) -> str:
    """``1 file was added (a.png)``, ``3 files were removed (a.png, b.png, c.png)``."""
    return f"{len(names)} {'file was' if len(names) == 1 else 'files were'} {what}"


@dataclass
class GalleryIndex:
    """A loaded index: where it is, its model record, its gallery's files and their embeddings."""

    path: Path
    model: dict[str, Any]
    gallery: Path
    files: list[GalleryFile]
    embeddings: torch.Tensor  # (N, D) float32

    def check_gallery(self, gallery: str | os.PathLike | None = None) -> None:
        """Raise :class:`StaleIndexError` when files were added to, removed from or changed in the gallery
        (``gallery`` overrides the folder recorded at build time, for a gallery that moved)."""
        folder = Path(gallery) if gallery is not None else self.gallery
        now = {f.path: f for f in scan_gallery(folder)}
        then = {f.path: f for f in self.files}
        if not now:  # rebuilding from it would be refused: say which folder was expected instead
            raise SearchIndexError(f"the gallery folder {str(folder)!r} holds no images now (the index "
                                   f"{str(self.path)!r} lists {len(then)}); expected a folder of images, the one "
                                   f"the index was built from ({str(self.gallery)!r}; if it moved, give its new "
                                   "place with --gallery DIR)")
        added = sorted(set(now) - set(then))
        removed = sorted(set(then) - set(now))
        changed = sorted(p for p in set(now) & set(then) if (now[p].size, now[p].mtime_ns) != (then[p].size,
                                                                                              then[p].mtime_ns))
        if added or removed or changed:
            found = [(what, names) for what, names in (("added", added), ("removed", removed), ("changed", changed))
                     if names]
            parts = [f"{_files_were(names, what)}{' since it was built' if i == 0 else ''} ({_listed(names)})"
                     for i, (what, names) in enumerate(found)]
            raise StaleIndexError(f"the index {str(self.path)!r} is stale: in its gallery {str(folder)!r}, "
                                  f"{'; '.join(parts)}; rebuild it with `kd-trainer index "
                                  f"{self.model['path']} --gallery {folder} --out {self.path}`")

    def check_model(self, encoder: Encoder) -> None:
        """Raise :class:`StaleIndexError` when ``encoder`` is not the model that embedded the gallery."""
        now = encoder.describe()
        if now["fingerprint"] != self.model["fingerprint"]:
            def name(m: dict[str, Any]) -> str:
                return f"{m['path']} ({m['kind']}{' ' + m['variant'] if m.get('variant') else ''}, " \
                       f"fingerprint {m['fingerprint'][:12]})"
            raise StaleIndexError(f"the index {str(self.path)!r} was built with another model: "
                                  f"{name(self.model)}, not {name(now)}; search with the model that built it, "
                                  "or rebuild the index with this one")


def _write_atomically(out: Path, meta: dict[str, Any], embeddings: np.ndarray) -> None:
    if out.exists() and not (out / INDEX_FILE).is_file():
        raise SearchIndexError(f"{str(out)!r} exists and is not a search index; expected a new path or "
                               "an index to replace")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        np.save(tmp / EMBEDDINGS_FILE, embeddings)
        (tmp / INDEX_FILE).write_text(json.dumps(meta) + "\n")
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_index(encoder: Encoder, gallery: str | os.PathLike, out: str | os.PathLike, *,
                batch_size: int = 64) -> GalleryIndex:
    """Embed every image of ``gallery`` with ``encoder`` and write the index folder ``out``.

    Refused, before anything is embedded: a gallery with no images, or with images that cannot be
    decoded (listed with what is wrong with each: the index would silently lack them)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise SearchIndexError(f"batch size must be a positive int, got {batch_size!r}")
    files = gallery_images(gallery)  # messages name the folder as given
    root = Path(gallery).resolve()
    paths = [str(root / f.path) for f in files]
    bad = find_unreadable(paths)
    if bad:
        shown = [f"{files[i].path} ({kind})" for i, (kind, _) in sorted(bad.items())]
        raise SearchIndexError(f"{len(bad)} of {len(files)} images in {str(gallery)!r} cannot be read: "
                               f"{_listed(shown)}; fix or remove them, then index again")
    embeddings = encoder.embed_images(paths, batch_size=batch_size).float().numpy()
    model = encoder.describe()
    meta = {"format": INDEX_FORMAT, "model": model, "gallery": str(root),
            "files": [[f.path, f.size, f.mtime_ns] for f in files],
            "embeddings": {"file": EMBEDDINGS_FILE, "shape": list(embeddings.shape), "dtype": "float32"}}
    out = Path(out).resolve()
    _write_atomically(out, meta, np.ascontiguousarray(embeddings, dtype=np.float32))
    return GalleryIndex(path=out, model=model, gallery=root, files=files, embeddings=torch.from_numpy(embeddings))


def load_index(path: str | os.PathLike) -> GalleryIndex:
    """Read an index folder written by :func:`build_index`; anything else is a :class:`SearchIndexError`."""
    folder = Path(path)
    meta_path = folder / INDEX_FILE
    what = "expected a folder written by `kd-trainer index`"
    if not meta_path.is_file():
        raise SearchIndexError(f"{str(path)!r} is not a search index (no {INDEX_FILE}); {what}")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SearchIndexError(f"{str(meta_path)!r} is not valid JSON ({e}); {what}") from None
    if not isinstance(meta, dict) or meta.get("format") != INDEX_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise SearchIndexError(f"{str(meta_path)!r} has format {found!r}, expected {INDEX_FORMAT!r}; {what}")
    try:
        embeddings = np.load(folder / EMBEDDINGS_FILE, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise SearchIndexError(f"the index {str(path)!r} has no readable {EMBEDDINGS_FILE} ({e}); "
                               "rebuild it with `kd-trainer index`") from None
    files = [GalleryFile(p, int(s), int(m)) for p, s, m in meta["files"]]
    if embeddings.dtype != np.float32 or embeddings.shape != (len(files), int(meta["model"]["embed_dim"])):
        raise SearchIndexError(f"the index {str(path)!r} is damaged: {EMBEDDINGS_FILE} holds {embeddings.dtype} "
                               f"{tuple(embeddings.shape)}, {INDEX_FILE} lists {len(files)} files of width "
                               f"{meta['model']['embed_dim']} (float32); rebuild it with `kd-trainer index`")
    return GalleryIndex(path=folder.resolve(), model=meta["model"], gallery=Path(meta["gallery"]), files=files,
                        embeddings=torch.from_numpy(embeddings))
