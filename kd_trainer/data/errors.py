"""The data layer's error, and how to get its one-line message back out of a DataLoader worker.

A ``DataLoader`` with ``num_workers > 0`` does not pass a worker's exception object to the
main process: ``torch.utils.data._utils.worker`` wraps it in an ``ExceptionWrapper``, and
``ExceptionWrapper.reraise`` builds a *new* exception of the same class whose message is

    Caught DatasetFormatError in DataLoader worker process 0.
    Original Traceback (most recent call last):
      File ".../worker.py", line ..., in _worker_loop
      ...
    kd_trainer.data.errors.DatasetFormatError: CUHK-PEDES: cannot decode image ...

so the user's one line ends up at the bottom of a traceback printed as the message.
:func:`unwrap_worker_error` recovers that line for the command line to print.
"""

from __future__ import annotations

import re

__all__ = ["DatasetFormatError", "unwrap_worker_error"]


class DatasetFormatError(ValueError):
    """A dataset on disk does not have the layout its loader expects, or a file in it cannot be read."""


# The first line ExceptionWrapper.reraise writes: "Caught <Name> in DataLoader worker process <n>."
_WORKER_HEADER = re.compile(r"\ACaught (?P<name>\w+) (?P<where>.*?)\.\nOriginal Traceback \(most recent call last\):\n",
                            re.DOTALL)


def _worker_message(exc: DatasetFormatError) -> str | None:
    """The original message inside a worker-wrapped ``exc``; None if ``exc`` was not wrapped."""
    text = str(exc)
    header = _WORKER_HEADER.match(text)
    if header is None or header.group("name") != type(exc).__name__:
        return None
    # traceback.format_exception ends with "<module>.<qualname>: <message>" for the raised
    # exception; chained causes come earlier, so the last occurrence is the one raised.
    label = f"{type(exc).__module__}.{type(exc).__qualname__}: "
    at = text.rfind("\n" + label)
    if at < 0:
        return None
    return text[at + 1 + len(label):].strip()


def unwrap_worker_error(exc: BaseException) -> DatasetFormatError | None:
    """The :class:`DatasetFormatError` behind ``exc``, with its original message, or None.

    Walks ``exc`` and its causes/contexts (a trainer may re-raise with ``from``). A
    DatasetFormatError re-raised by a DataLoader worker comes back as a new error carrying
    only the original message (what the worker's code raised); one raised in the main
    process is returned as is. None when no DatasetFormatError is in the chain, so the
    caller lets other exceptions (programming errors) surface with their traceback.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, DatasetFormatError):
            original = _worker_message(current)
            if original is None:
                return current
            unwrapped = type(current)(original)
            unwrapped.__cause__ = current  # the worker's traceback stays reachable for debugging
            return unwrapped
        current = current.__cause__ or current.__context__
    return None
