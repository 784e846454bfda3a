"""Generated data sets are cached by their generation arguments: a folder is reused only when
the arguments that wrote it (kept in a small JSON file, written last) are the ones asked for."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def already_generated(out: Path, meta_file: str, args: dict[str, Any], what: str) -> bool:
    """True when ``out`` holds the set ``args`` generate; an error when it holds another one."""
    meta = out / meta_file
    if not meta.is_file():
        return False
    on_disk = json.loads(meta.read_text())
    if on_disk == args:
        return True
    raise ValueError(f"{out} holds {what} made with other arguments ({on_disk}, asked {args}); "
                     "use another data.root or delete it")


def mark_generated(out: Path, meta_file: str, args: dict[str, Any]) -> None:
    """Record the arguments, last: a folder without this file is an interrupted write."""
    (out / meta_file).write_text(json.dumps(args, indent=2))
