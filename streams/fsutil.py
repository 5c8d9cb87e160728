"""File helpers: the one atomic write helper of the package, and chunked hashing."""
from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

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
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
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
