"""The error every checkpoint load raises: it says what was found and what was expected."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message says what was found and expected."""
