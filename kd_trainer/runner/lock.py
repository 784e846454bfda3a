"""One run per output folder: a lock file held for the run's length, taken over when stale."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any, Iterator

from accelerate import PartialState

from kd_trainer.runner.errors import RunFault

__all__ = ["LOCK_FILE", "output_lock"]

logger = logging.getLogger("kd_trainer")

LOCK_FILE = ".kd_trainer.lock"


@contextlib.contextmanager
def output_lock(output_dir: str) -> Iterator[None]:
    """Hold ``output_dir`` for this run: a second run writing there at the same time would mix its
    checkpoints with ours. A lock left by a process that no longer runs (on this host) is stale and
    taken over, and so is an empty or unreadable one (a lock is written whole, so no live run holds
    one); one held by a live process is refused, saying how to clear it."""
    if not PartialState().is_main_process:
        yield
        return
    os.makedirs(output_dir, exist_ok=True)
    lock = Path(output_dir, LOCK_FILE)
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(2):
        if _create(lock, me):
            break
        if not lock.exists():
            continue  # released meanwhile: try again
        holder = _holder(lock)
        if holder is None:
            logger.warning("taking over the stale lock %s: it is empty or unreadable (left by a run that stopped "
                           "while writing it)", lock)
            lock.unlink(missing_ok=True)
            continue
        if holder.get("host") == me["host"] and not _alive(int(holder.get("pid", -1))):
            logger.warning("taking over the stale lock %s of process %s, which no longer runs", lock,
                           holder.get("pid"))
            lock.unlink(missing_ok=True)
            continue
        raise RunFault(f"{output_dir} is in use by another run (process {holder.get('pid')} on "
                       f"{holder.get('host')}): give this run its own training.output_dir, or, if that run "
                       f"is not running any more, delete {lock}") from None
    else:
        raise RunFault(f"{output_dir}: another run took the lock {lock} at the same moment; run again, or give "
                       "this run its own training.output_dir")
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _create(lock: Path, me: dict[str, Any]) -> bool:
    """Create ``lock`` holding ``me``, whole or not at all (False when it exists): the content is
    written to a file of our own and hard-linked into place, so no run ever sees a half-written
    lock of a live run. Where hard links are not supported, an exclusive create is the fallback."""
    mine = lock.with_name(f"{lock.name}.{me['pid']}")
    mine.write_text(json.dumps(me))
    try:
        os.link(mine, lock)
        return True
    except FileExistsError:
        return False
    except OSError:  # no hard links on this file system
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return True
    finally:
        mine.unlink(missing_ok=True)


def _holder(lock: Path) -> dict[str, Any] | None:
    """Who holds ``lock`` ({'pid', 'host'}), None when it is empty or unreadable."""
    try:
        holder = json.loads(lock.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(holder, dict) or not isinstance(holder.get("pid"), int):
        return None
    return holder


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
