"""Failed writes in the user's words: OS and database errors -> one-line store errors.

A write that fails (disk full, an I/O error, a database that cannot be written) becomes a
:class:`~expert_store.errors.StoreWriteError` (or, when the place cannot be written at
all, a :class:`~expert_store.errors.ReadOnlyStoreError`) whose message says what failed
and what it left, e.g. ``disk full while writing object 3fa2c1… into /s/objects (No space
left on device); nothing was committed``. Callers add the last part, which only they know
(:meth:`StoreWriteError.with_outcome`).
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy.exc import OperationalError

from .errors import ReadOnlyStoreError, StoreError, StoreWriteError

__all__ = ["is_read_only_error", "os_words", "db_words", "os_error", "db_error", "write_guard", "read_only_guard"]

_READ_ONLY_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS}

_WORDS = {
    errno.ENOSPC: "disk full",
    errno.EDQUOT: "disk quota exceeded",
    errno.EIO: "I/O error",
    errno.EROFS: "read-only filesystem",
    errno.EFBIG: "file too large",
    errno.ENOMEM: "out of memory",
}


def is_read_only_error(exc: OSError) -> bool:
    """Whether an OS error means "this place cannot be written" (permissions, read-only fs)."""
    return exc.errno in _READ_ONLY_ERRNOS


def os_words(exc: OSError) -> str:
    """``ENOSPC`` -> ``"disk full"``, ``EIO`` -> ``"I/O error"``, else the OS's own text."""
    return _WORDS.get(exc.errno or 0) or (exc.strerror or type(exc).__name__).lower()


def _db_text(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    return str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__


def db_words(exc: BaseException) -> str:
    """SQLite's "database or disk is full" -> ``"disk full"``, "disk I/O error" -> ``"I/O
    error"`` (PostgreSQL's "No space left on device" too); anything else ``"database error"``."""
    text = _db_text(exc).lower()
    if "disk is full" in text or "no space left" in text or "disk full" in text:
        return "disk full"
    if "i/o error" in text or "input/output error" in text:
        return "I/O error"
    return "database error"


def _db_read_only(exc: BaseException) -> bool:
    text = _db_text(exc).lower()
    return "readonly" in text or "read-only" in text or "unable to open" in text


_INFINITIVES = {"writing": "write", "creating": "create", "deleting": "delete", "recording": "record",
                "moving": "move", "checking": "check", "committing": "commit", "making": "make"}


def _cannot(what: str) -> str:
    """``"writing object x"`` -> ``"cannot write object x"``."""
    verb, _, rest = what.partition(" ")
    return f"cannot {_INFINITIVES[verb]} {rest}" if verb in _INFINITIVES else f"cannot finish {what}"


def _named(filename: str, what: str) -> bool:
    """Whether ``what`` already names ``filename`` or a directory holding it (a temp file)."""
    return any(filename.startswith(word.rstrip(":,;")) for word in what.split() if "/" in word)


def os_error(exc: OSError, what: str, outcome: str | None = None) -> StoreError:
    """The store error for ``exc``, met while doing ``what`` (a gerund: "writing object …")."""
    if is_read_only_error(exc):
        tail = f"; {outcome}" if outcome else "; the store is unchanged"
        return ReadOnlyStoreError(f"{_cannot(what)}: {exc.strerror}{tail}")
    where = f": {exc.filename}" if exc.filename and not _named(str(exc.filename), what) else ""
    message = f"{os_words(exc)} while {what} ({exc.strerror or exc}{where})"
    return StoreWriteError(message + (f"; {outcome}" if outcome else ""), errno=exc.errno)


def db_error(exc: OperationalError, what: str, outcome: str | None = None, path: Path | None = None) -> StoreError:
    """The store error for a database error met while doing ``what``."""
    tail = f"; {outcome}" if outcome else ""
    if _db_read_only(exc):
        where = f" at {path}" if path is not None else ""
        return ReadOnlyStoreError(f"the store database{where} cannot be written: {_db_text(exc)}"
                                  + (tail or "; the store is unchanged"))
    return StoreWriteError(f"{db_words(exc)} while {what} ({_db_text(exc)}){tail}")


@contextmanager
def write_guard(what: str, outcome: str, path: Path | None = None) -> Iterator[None]:
    """Turn OS and database errors of the block into store errors ending in ``outcome``;
    a :class:`StoreWriteError` from inside gets ``outcome`` appended."""
    try:
        yield
    except StoreWriteError as exc:
        raise exc.with_outcome(outcome) from exc
    except OperationalError as exc:
        raise db_error(exc, what, outcome, path) from exc
    except OSError as exc:
        if isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError)):
            raise  # a vanished file or a wrong path: not a failed write
        raise os_error(exc, what, outcome) from exc


@contextmanager
def read_only_guard(path: Path) -> Iterator[None]:
    """Turn 'cannot write the database' into :class:`ReadOnlyStoreError`."""
    try:
        yield
    except OperationalError as exc:
        if _db_read_only(exc):
            raise db_error(exc, "writing the store database", None, path) from exc
        raise
