"""Exceptions of the `lifelong` package: one base, specific subclasses."""

from __future__ import annotations

__all__ = ["LifelongError", "ConfigError"]


class LifelongError(Exception):
    """Base of every error raised on purpose by `lifelong`."""

    hint: str | None = None


class ConfigError(LifelongError, ValueError):
    """An invalid configuration; the message names the offending field."""
