"""File helpers: the one atomic write helper of the package, chunked hashing, and failed
writes (of files or of the database) in the user's words (:func:`write_errors`)."""
from __future__ import annotations

import errno
import hashlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from sqlalchemy.exc import OperationalError

from .errors import StreamError, StreamWriteError

CHUNK = 1 << 20  # 1 MiB reads: bounded memory whatever the file size


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes | Iterable[bytes]) -> None:
    """Write ``data`` to ``path`` atomically: temp file in the same dir, fsync, replace.

    ``data`` is the bytes, or an iterable of chunks (written as they come: bounded memory).
    The temp file starts with a dot and ends in ``.tmp`` so that drop-folder listings
    never see a half-written file; on any error it is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in (data,) if isinstance(data, (bytes, bytearray, memoryview)) else data:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):  # the write's own error is the one to report
            os.unlink(tmp)
        raise


def write_if_changed(path: str | os.PathLike[str], data: bytes) -> bool:
    """Atomically write ``data`` unless ``path`` already holds exactly it (keeps sha256
    and mtime stable, so a stream does not see a rewritten file). Returns True if written."""
    p = Path(path)
    try:
        if p.stat().st_size == len(data) and p.read_bytes() == data:
            return False
    except FileNotFoundError:
        pass
    atomic_write_bytes(p, data)
    return True


def sha256_file(path: str | os.PathLike[str]) -> str:
    """sha256 hex digest of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


#: OS errors that mean "the disk would not take it" rather than "this input is bad".
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG})
_WORDS = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded", errno.EIO: "I/O error",
          errno.EROFS: "read-only filesystem", errno.EFBIG: "file too large"}


def os_words(exc: OSError) -> str:
    """``ENOSPC`` -> ``"disk full"``, ``EIO`` -> ``"I/O error"``, else the OS's own words."""
    return _WORDS.get(exc.errno or 0) or (exc.strerror or type(exc).__name__).lower()


def db_words(exc: BaseException) -> tuple[str, str]:
    """("disk full" | "I/O error" | "database error", the driver's first line) of a database error."""
    text = (str(getattr(exc, "orig", None) or exc).strip().splitlines() or [type(exc).__name__])[0]
    low = text.lower()
    if "disk is full" in low or "no space left" in low:
        return "disk full", text
    if "i/o error" in low or "input/output" in low:
        return "I/O error", text
    return "database error", text


@contextmanager
def write_errors(what: str, outcome: str) -> Iterator[None]:
    """Raise a failed write of the block — an ``OSError`` of the disk (:data:`DISK_ERRNOS`) or
    a database ``OperationalError`` — as one :class:`StreamWriteError` line: "disk full while
    ``what`` (…); ``outcome``". Errors about the input (a missing or bad file) pass unchanged,
    and so does a :class:`StreamError` raised inside."""
    try:
        yield
    except StreamError:
        raise
    except OperationalError as exc:
        words, text = db_words(exc)
        raise StreamWriteError(f"{words} while {what} ({text}); {outcome}") from exc
    except OSError as exc:
        if exc.errno not in DISK_ERRNOS:
            raise
        where = f": {exc.filename}" if exc.filename else ""
        raise StreamWriteError(f"{os_words(exc)} while {what} ({exc.strerror}{where}); {outcome}",
                               errno=exc.errno) from exc
