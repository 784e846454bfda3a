"""What goes wrong with an index, as one line each: the CLI prints it and exits 2."""

from __future__ import annotations

__all__ = ["SearchIndexError", "StaleIndexError"]


class SearchIndexError(ValueError):
    """An index that cannot be built, read or used as asked (the message says what and what was expected)."""


class StaleIndexError(SearchIndexError):
    """The index no longer describes its gallery (files added, removed or changed) or its model."""
