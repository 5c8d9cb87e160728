"""Exceptions of the expert store: one base class, one subclass per failure.

Every error raised by :mod:`expert_store` on purpose is a :class:`StoreError`, so callers
can catch the whole family with one clause and still tell the cases apart.
"""

from __future__ import annotations

__all__ = [
    "StoreError",
    "NotAStoreError",
    "StoreExistsError",
    "SchemaVersionError",
    "ReadOnlyStoreError",
    "StoreWriteError",
    "UnknownVersionError",
    "UnknownShardError",
    "InvalidCommitError",
    "ConflictError",
    "RefError",
    "CorruptObjectError",
    "MissingObjectError",
    "BudgetExceededError",
    "DatabaseUnreachableError",
    "StoreNotSharedError",
]


class StoreError(Exception):
    """Base class of every error the expert store raises on purpose."""


class NotAStoreError(StoreError):
    """The path (or database) is not an expert store."""


class StoreExistsError(StoreError):
    """``ExpertStore.init`` was asked to create a store where one already exists."""


class SchemaVersionError(StoreError):
    """The database was written by a newer or unknown schema version."""


class ReadOnlyStoreError(StoreError):
    """The store directory or database cannot be written; nothing was changed."""


class StoreWriteError(StoreError):
    """A write failed (disk full, an I/O error, the database refused it); nothing half-done
    is visible. The message says what failed and what it left, in one line: "disk full
    while writing object 3fa2c1… into /s/objects (No space left on device); nothing was
    committed". ``errno`` is the OS error number when there is one.
    """

    def __init__(self, message: str, *, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno

    def with_outcome(self, outcome: str) -> StoreWriteError:
        """This error with ``; outcome`` appended (once)."""
        text = str(self)
        if text.endswith(outcome):
            return self
        return StoreWriteError(f"{text}; {outcome}", errno=self.errno)


class UnknownVersionError(StoreError, LookupError):
    """A version spec (id, ``vN``, ref, ``REF~n``) names no version."""


class UnknownShardError(StoreError, LookupError):
    """A shard id names no shard row."""


class InvalidCommitError(StoreError, ValueError):
    """The arguments of a commit are inconsistent (overlapping rows, empty tensors, ...)."""


class ConflictError(StoreError):
    """A compare-and-swap on a ref lost: the ref no longer points where the caller expected."""


class RefError(StoreError, ValueError):
    """A ref name is invalid, or a tag was asked to move."""


class CorruptObjectError(StoreError):
    """An object's bytes do not hash to its name (or cannot be parsed).

    ``hash`` is the object's name; ``shard_id`` and ``version_ids`` name what uses it when
    the error comes from loading a shard.
    """

    def __init__(
        self,
        message: str,
        *,
        hash: str | None = None,
        shard_id: int | None = None,
        version_ids: tuple[int, ...] = (),
    ) -> None:
        super().__init__(message)
        self.hash = hash
        self.shard_id = shard_id
        self.version_ids = version_ids


class MissingObjectError(CorruptObjectError):
    """A row references an object file that does not exist."""


class BudgetExceededError(StoreError):
    """A checkout would put more bytes on a device than its budget allows.

    Raised before anything is loaded; ``needed``, ``resident`` and ``budget`` are bytes.
    """

    def __init__(self, message: str, *, needed: int, resident: int, budget: int) -> None:
        super().__init__(message)
        self.needed = needed
        self.resident = resident
        self.budget = budget


class DatabaseUnreachableError(StoreError):
    """The store's database server cannot be reached (refused, unknown host, bad login)."""


class StoreNotSharedError(StoreError):
    """The store directory is not the same directory on every host (see :mod:`.sharing`)."""


class OversizedValueError(StoreError, ValueError):
    """A JSON value (a version's metrics, config or cursors; any JSON column on the store's
    database) is larger than the store accepts: refused before it is parsed, or, at commit,
    before anything is written."""
