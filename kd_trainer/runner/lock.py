"""One run per output folder: a lock file held for the run's length, taken over when stale."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from pathlib import Path
from typing import Iterator

from accelerate import PartialState

from kd_trainer.runner.errors import RunFault

__all__ = ["LOCK_FILE", "output_lock"]

logger = logging.getLogger("kd_trainer")

LOCK_FILE = ".kd_trainer.lock"


@contextlib.contextmanager
def output_lock(output_dir: str) -> Iterator[None]:
    """Hold ``output_dir`` for this run: a second run writing there at the same time would mix its
    checkpoints with ours. A lock left by a process that no longer runs (on this host) is stale and
    taken over; one held by a live process is refused, saying how to clear it."""
    if not PartialState().is_main_process:
        yield
        return
    os.makedirs(output_dir, exist_ok=True)
    lock = Path(output_dir, LOCK_FILE)
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                holder = json.loads(lock.read_text() or "{}")
            except (OSError, ValueError):
                holder = {}
            if holder.get("host") == me["host"] and not _alive(int(holder.get("pid", -1))):
                logger.warning("removing the stale lock %s of process %s, which no longer runs", lock,
                               holder.get("pid"))
                lock.unlink(missing_ok=True)
                continue
            raise RunFault(f"{output_dir} is in use by another run (process {holder.get('pid')} on "
                           f"{holder.get('host')}): give this run its own training.output_dir, or, if that run "
                           f"is not running any more, delete {lock}") from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
