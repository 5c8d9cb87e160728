"""Exceptions of the `lifelong` package: one base, specific subclasses.

The CLI prints any of these (and the ``expert_store`` / ``streams`` bases) as one line plus
its hint; every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["LifelongError", "ConfigError", "CLIError", "DataError"]


class LifelongError(Exception):
    """Base of every error raised on purpose by `lifelong`."""

    hint: str | None = None

    def __init__(self, message: str = "", hint: str | None = None):
        super().__init__(message)
        if hint is not None:
            self.hint = hint


class ConfigError(LifelongError, ValueError):
    """An invalid configuration; the message names the offending field."""


class CLIError(LifelongError):
    """A command-line usage problem (no store given, a bad combination of flags)."""


class DataError(LifelongError):
    """Too little data to do what was asked (no block to train or evaluate on)."""
