"""What a stream knows of its files: path, size, mtime and sha256 (``stream_files``).

Acts as a sha256 cache: a file whose size and mtime_ns are unchanged is not re-hashed
(the heuristic git uses). Changes are written back in one transaction by ``flush``.
"""
from __future__ import annotations

import os
from datetime import datetime, timezone

from sqlalchemy import Engine, delete, insert, select

from .errors import UnreadableFileError, VanishedFileError
from .fsutil import sha256_file
from .schema import stream_files


class FileIndex:
    """Per-stream file identities, loaded once, flushed once."""

    def __init__(self, engine: Engine, stream: str) -> None:
        self.engine, self.stream = engine, stream
        with engine.connect() as conn:
            rows = conn.execute(select(stream_files).where(stream_files.c.stream == stream)).all()
        self._known = {r.path: r._asdict() for r in rows}
        self._dirty: set[str] = set()

    def stat(self, path: str) -> os.stat_result:
        """``os.stat`` with errors named after the path (dir, dangling link, vanished)."""
        try:
            st = os.stat(path)
        except FileNotFoundError as exc:
            if os.path.islink(path):
                raise UnreadableFileError(path, "dangling symbolic link") from exc
            raise VanishedFileError(path, "file disappeared after it was listed") from exc
        except OSError as exc:
            raise UnreadableFileError(path, f"cannot stat: {exc.strerror or exc}") from exc
        if os.path.isdir(path):
            raise UnreadableFileError(path, "is a directory, expected a file")
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
        with self.engine.begin() as conn:
            conn.execute(delete(stream_files).where(stream_files.c.stream == self.stream,
                                                    stream_files.c.path.in_(sorted(self._dirty))))
            conn.execute(insert(stream_files), rows)
        self._dirty.clear()
