"""How a run fails for the user: bad input and known faults end in one line naming what was wrong
(the recipe key, dataset record, checkpoint file), exit code 2 and no traceback; a bug keeps its
traceback, which is what a report needs."""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator

from kd_trainer.data import DatasetFormatError, unwrap_worker_error
from kd_trainer.distill.cache import CacheMismatchError
from kd_trainer.distill.checkpoints import CheckpointSaveError
from kd_trainer.distill.core import NonFiniteLossError
from kd_trainer.models.loading import CheckpointError
from kd_trainer.recipe import RecipeError

__all__ = ["INPUT_ERRORS", "RunFault", "one_line_errors"]


class RunFault(RuntimeError):
    """A run that cannot go on or finish as asked (a busy output folder, a failed push, NaN weights)."""


# Bad input and faults: the message names the recipe key, dataset record, checkpoint file or what
# went wrong; the CLI prints it on one line and exits 2, without a traceback.
INPUT_ERRORS: tuple[type[BaseException], ...] = (RecipeError, DatasetFormatError, CheckpointError,
                                                 CacheMismatchError, NonFiniteLossError, CheckpointSaveError,
                                                 RunFault)


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    """Bad input and known faults end in ``error: <message>`` and exit code 2, without a traceback;
    a data error raised inside a DataLoader worker is unwrapped to its own one line first."""
    try:
        yield
    except INPUT_ERRORS as e:
        print(f"error: {unwrap_worker_error(e) or e}", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception as e:
        data_error = unwrap_worker_error(e)
        if data_error is None:
            raise  # a bug: its traceback is what a report needs
        print(f"error: {data_error}", file=sys.stderr)
        raise SystemExit(2) from None
