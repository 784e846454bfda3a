"""How a run fails for the user: bad input and known faults end in one line naming what was wrong
(the recipe key, dataset record, checkpoint file), exit code 2 and no traceback; a bug keeps its
traceback, which is what a report needs."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from typing import Iterator, NoReturn

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
    a data error raised inside a DataLoader worker is unwrapped to its own one line first. Ctrl-C
    ends in one line too, with the shell's code for it (130)."""
    try:
        yield
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C); a run resumes from its last complete checkpoint-N with "
              "training.resume_from_checkpoint=true", file=sys.stderr)
        raise SystemExit(130) from None
    except INPUT_ERRORS as e:
        _fail(f"error: {unwrap_worker_error(e) or e}")
    except Exception as e:
        data_error = unwrap_worker_error(e)
        if data_error is None:
            raise  # a bug: its traceback is what a report needs
        _fail(f"error: {data_error}")


def _fail(line: str) -> NoReturn:
    """Print ``line`` and exit 2. Under a torch elastic launcher (``accelerate launch``, ``torchrun``)
    the line also goes into this process's error file, so the launcher's failure summary names the
    cause instead of 'To enable traceback see ...' (the launcher itself then exits 1)."""
    print(line, file=sys.stderr)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        try:
            with open(error_file, "w") as f:
                json.dump({"message": line.replace("\n", "\n  "), "timestamp": int(time.time())}, f)
        except OSError:
            pass  # the line is on stderr either way
    raise SystemExit(2) from None
