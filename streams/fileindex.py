"""What a stream knows of its files: path, size, mtime and sha256 (``stream_files``).

Acts as a sha256 cache: a file whose size and mtime_ns are unchanged is not re-hashed
(the heuristic git uses). Changes are written back in one transaction by ``flush``.
Only regular files are indexed: a FIFO, device, socket, directory, symbolic link loop or a
name that is not UTF-8 is refused by ``stat`` (``UnreadableFileError`` naming it).
"""
from __future__ import annotations

import errno
import os
import stat as stat_mod
from datetime import datetime, timezone

from sqlalchemy import Engine, delete, insert, select

from .errors import UnreadableFileError, VanishedFileError, show_path
from .fsutil import sha256_file
from .schema import stream_files, write_begin


_SPECIAL = ((stat_mod.S_ISDIR, "is a directory, expected a file"),
            (stat_mod.S_ISFIFO, "is a FIFO (named pipe), not a regular file; streams read "
                                "only regular files (reading a pipe would wait forever)"),
            (stat_mod.S_ISCHR, "is a character device, not a regular file; streams read only "
                               "regular files"),
            (stat_mod.S_ISBLK, "is a block device, not a regular file; streams read only "
                               "regular files"),
            (stat_mod.S_ISSOCK, "is a socket, not a regular file; streams read only regular files"))


def not_regular(mode: int) -> str | None:
    """Why a file of ``st_mode`` ``mode`` cannot be read as data, or None if it is regular."""
    if stat_mod.S_ISREG(mode):
        return None
    return next((why for test, why in _SPECIAL if test(mode)), "is not a regular file")


def is_link_loop(path: str) -> bool:
    """Whether ``path`` is a symbolic link to a directory that contains the link itself."""
    if not os.path.islink(path):
        return False
    target, parent = os.path.realpath(path), os.path.realpath(os.path.dirname(path))
    return parent == target or parent.startswith(target.rstrip(os.sep) + os.sep)


def _dir_link_problem(path: str) -> str:
    target = os.path.realpath(path)
    if is_link_loop(path):
        return (f"symbolic link loop: it points to {show_path(target)}, a directory that "
                "contains it (links to directories inside a drop folder are not followed)")
    return f"symbolic link to a directory ({show_path(target)}), expected a file"


class FileIndex:
    """Per-stream file identities, loaded once, flushed once."""

    def __init__(self, engine: Engine, stream: str) -> None:
        self.engine, self.stream = engine, stream
        with engine.connect() as conn:
            rows = conn.execute(select(stream_files).where(stream_files.c.stream == stream)).all()
        self._known = {r.path: r._asdict() for r in rows}
        self._dirty: set[str] = set()

    def stat(self, path: str) -> os.stat_result:
        """``os.stat`` of a regular file, with errors named after the path (a directory,
        FIFO or device, a dangling link or link loop, vanished, a name not in UTF-8)."""
        try:
            path.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise UnreadableFileError(path, "file name is not valid UTF-8; rename the file") from exc
        try:
            st = os.stat(path)
        except FileNotFoundError as exc:
            if os.path.islink(path):
                raise UnreadableFileError(path, "dangling symbolic link") from exc
            raise VanishedFileError(path, "file disappeared after it was listed") from exc
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnreadableFileError(path, "symbolic link loop") from exc
            raise UnreadableFileError(path, f"cannot stat: {exc.strerror or exc}") from exc
        problem = not_regular(st.st_mode)
        if problem and stat_mod.S_ISDIR(st.st_mode) and os.path.islink(path):
            problem = _dir_link_problem(path)
        if problem:
            raise UnreadableFileError(path, problem)
        return st

    def identity(self, path: str) -> tuple[int, str]:
        """``(size, sha256)`` of ``path``, from the cache when size and mtime match."""
        st = self.stat(path)
        known = self._known.get(path)
        if known and known["size"] == st.st_size and known["mtime_ns"] == st.st_mtime_ns:
            return st.st_size, known["sha256"]
        try:
            sha = sha256_file(path)
        except FileNotFoundError as exc:
            raise VanishedFileError(path, "file disappeared while being hashed") from exc
        self.record(path, st.st_size, st.st_mtime_ns, sha)
        return st.st_size, sha

    def record(self, path: str, size: int, mtime_ns: int, sha256: str) -> None:
        now = datetime.now(timezone.utc)
        prev = self._known.get(path)
        self._known[path] = {"stream": self.stream, "path": path, "size": size,
                             "mtime_ns": mtime_ns, "sha256": sha256,
                             "first_seen": prev["first_seen"] if prev else now, "last_seen": now}
        self._dirty.add(path)

    def flush(self) -> None:
        """Write changed entries (idempotent; safe to lose in a crash: it is a cache)."""
        if not self._dirty:
            return
        rows = [self._known[p] for p in sorted(self._dirty)]
        with write_begin(self.engine) as conn:
            conn.execute(delete(stream_files).where(stream_files.c.stream == self.stream,
                                                    stream_files.c.path.in_(sorted(self._dirty))))
            conn.execute(insert(stream_files), rows)
        self._dirty.clear()
