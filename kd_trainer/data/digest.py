"""The package's one file digest: blake2b with a 16-byte digest, as hex, read in chunks.

    file_digest("runs/demo/teacher/model.safetensors")   # "de21762b68cfe4c54908d37d60d3eea3"

Files record it (the demo's ``demo_provenance.json``, a teacher cache's layout, a data set's
image contents), so the same bytes must always give the same text: changing the hash or its size
would make every recorded digest look stale.
"""

from __future__ import annotations

import hashlib
import os

__all__ = ["file_digest"]


def file_digest(path: str | os.PathLike) -> str:
    """The blake2b (16-byte) hex digest of the file's bytes."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, lambda: hashlib.blake2b(digest_size=16)).hexdigest()
