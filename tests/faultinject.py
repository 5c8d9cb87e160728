"""The fault injector: while active, the Nth write of the process fails (see ``faultlib``).

An :class:`Injector` stands in for the Python-level calls through which the project writes
— ``os.open`` (to create or write, or of a directory to fsync it), ``os.write``,
``write``/``writelines``/``flush`` of files opened for writing with
``open``/``io.open``/``os.fdopen``, ``os.fsync``/``fdatasync``, ``os.replace``/``rename``,
``os.mkdir`` (of a path not there yet), ``os.unlink``/``remove``/``rmdir``,
``os.chmod``/``fchmod``/``utime`` — and for the database every INSERT/UPDATE/DELETE/DDL
statement and the COMMIT of every transaction that wrote (patched in SQLAlchemy's dialect,
so every engine is covered). Each call is an *injection point*; call number ``fail_at``
raises ``OSError(ENOSPC or EIO)``, or ``sqlite3.OperationalError`` with SQLite's own text
("database or disk is full", "disk I/O error"), which SQLAlchemy wraps as it would the
real thing. Only calls of the thread that activated the injector and of the store's
object-writer threads count (a lease's keep-alive thread runs on its own clock).
"""

from __future__ import annotations

import builtins
import errno as errno_module
import io
import os
import sqlite3
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.engine import default as sa_default

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("expert_store", "streams", "lifelong")
ERRNOS = {"ENOSPC": errno_module.ENOSPC, "EIO": errno_module.EIO}
SQLITE_TEXT = {errno_module.ENOSPC: "database or disk is full", errno_module.EIO: "disk I/O error"}
_DB_WRITES = ("INSERT", "UPDATE", "DELETE", "CREATE", "ALTER", "DROP", "REPLACE")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_COUNTED_THREADS = ("expert-store-write",)



@dataclass(frozen=True)
class Point:
    """One injection point: its number in the run, kind, where the project made the call."""

    n: int
    kind: str  # open | write | fsync | replace | mkdir | unlink | chmod | db-write | db-commit
    where: str  # innermost project frame, "expert_store/objects.py:131 atomic_write"
    target: str  # path or SQL

    def __str__(self) -> str:
        return f"#{self.n} {self.kind} at {self.where} ({self.target})"


def _where() -> str:
    """The innermost frame in the project's packages (else the innermost outside this file)."""
    frame = sys._getframe(2)
    fallback = None
    while frame is not None:
        name = frame.f_code.co_filename
        if name != __file__:
            try:
                rel = Path(name).resolve().relative_to(REPO)
            except ValueError:
                rel = None
            if rel is not None and rel.parts[0] in PACKAGES:
                return f"{rel}:{frame.f_lineno} {frame.f_code.co_name}"
            if fallback is None and "/lib/python" in name and "site-packages" in name:
                fallback = f"{name.split('site-packages/')[-1]}:{frame.f_lineno} {frame.f_code.co_name}"
        frame = frame.f_back
    return fallback or "?"


class _File:
    """A file opened for writing whose ``write``/``writelines``/``flush`` are injection points."""

    def __init__(self, f: Any, injector: Injector, name: str) -> None:
        self._f, self._inj, self._name = f, injector, name

    def write(self, data: Any) -> Any:
        self._inj.hit("write", self._name)
        return self._f.write(data)

    def writelines(self, lines: Any) -> None:
        self._inj.hit("write", self._name)
        self._f.writelines(lines)

    def flush(self) -> None:
        self._inj.hit("write", self._name)
        self._f.flush()

    def __enter__(self) -> _File:
        self._f.__enter__()
        return self

    def __exit__(self, *exc: Any) -> Any:
        return self._f.__exit__(*exc)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._f)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def _writing(mode: str) -> bool:
    return any(c in mode for c in "wax+")


class Injector:
    """Counts injection points while active; the ``fail_at``-th raises ``errno``'s error (or,
    with ``fail_kind``, the first point of that kind).

    ``armed`` False: calls pass uncounted until something sets it (an operation that
    injects only from a given step on, such as a cycle's commit).
    """

    def __init__(self, fail_at: int | None = None, errno: int = errno_module.ENOSPC, *, armed: bool = True,
                 fail_kind: str | None = None) -> None:
        self.fail_at, self.errno, self.armed, self.fail_kind = fail_at, errno, armed, fail_kind
        self.points: list[Point] = []
        self.fired: Point | None = None
        self._lock = threading.Lock()
        self._thread: int | None = None
        self._db_pending: set[int] = set()
        self._saved: list[tuple[Any, str, Any]] = []

    # -- counting -----------------------------------------------------------------------
    def _counted(self) -> bool:
        if not self.armed:
            return False
        if threading.get_ident() == self._thread:
            return True
        return threading.current_thread().name.startswith(_COUNTED_THREADS)

    def hit(self, kind: str, target: Any) -> None:
        """Count one call; raise the injected error if it is call number ``fail_at``."""
        if not self._counted():
            return
        with self._lock:
            point = Point(len(self.points) + 1, kind, _where(), str(target)[:160])
            self.points.append(point)
            if point.n != self.fail_at and (self.fail_kind != kind or self.fired is not None):
                return
            self.fired = point
        if kind.startswith("db-"):
            raise sqlite3.OperationalError(SQLITE_TEXT.get(self.errno, os.strerror(self.errno)))
        raise OSError(self.errno, os.strerror(self.errno), str(target))

    # -- patches ------------------------------------------------------------------------
    def _patch(self, owner: Any, name: str, make: Callable[[Any], Any]) -> None:
        real = getattr(owner, name)
        self._saved.append((owner, name, real))
        setattr(owner, name, make(real))

    def _os(self, name: str, kind: str, when: Callable[..., bool] = lambda *a, **k: True) -> None:
        def make(real: Any) -> Any:
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                if when(*args, **kwargs):
                    self.hit(kind, args[0] if args else "")
                return real(*args, **kwargs)
            return wrapper
        self._patch(os, name, make)

    def __enter__(self) -> Injector:
        self._thread = threading.get_ident()

        def opens_to_write(path: Any, flags: int, *a: Any, dir_fd: Any = None, **k: Any) -> bool:
            if flags & _WRITE_FLAGS:
                return True
            return dir_fd is None and isinstance(path, (str, bytes, os.PathLike)) and os.path.isdir(path)

        def absent(path: Any, *a: Any, dir_fd: Any = None, **k: Any) -> bool:
            return dir_fd is not None or not os.path.lexists(path)

        def present(path: Any, *a: Any, dir_fd: Any = None, **k: Any) -> bool:
            return dir_fd is not None or os.path.lexists(path)

        self._os("open", "open", opens_to_write)
        self._os("write", "write")
        self._os("fsync", "fsync")
        self._os("fdatasync", "fsync")
        self._os("replace", "replace")
        self._os("rename", "replace")
        self._os("mkdir", "mkdir", absent)
        for name in ("unlink", "remove", "rmdir"):
            self._os(name, "unlink", present)
        for name in ("chmod", "fchmod", "utime"):
            self._os(name, "chmod")

        def make_open(real: Any) -> Any:
            def wrapper(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
                if not _writing(mode):
                    return real(file, mode, *args, **kwargs)
                self.hit("open", file)
                return _File(real(file, mode, *args, **kwargs), self, str(file))
            return wrapper

        def make_fdopen(real: Any) -> Any:
            def wrapper(fd: int, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
                f = real(fd, mode, *args, **kwargs)
                return _File(f, self, f"fd {fd}") if _writing(mode) else f
            return wrapper

        self._patch(builtins, "open", make_open)
        self._patch(io, "open", make_open)
        self._patch(os, "fdopen", make_fdopen)
        self._patch_db()
        return self

    def _patch_db(self) -> None:
        pending = self._db_pending

        def statement_hook(real: Any) -> Any:
            def wrapper(dialect: Any, cursor: Any, statement: str, *args: Any, **kwargs: Any) -> Any:
                words = statement.lstrip().split(None, 1)
                if words and words[0].upper() in _DB_WRITES and self._counted():
                    pending.add(id(cursor.connection))
                    self.hit("db-write", " ".join(statement.split())[:80])
                return real(dialect, cursor, statement, *args, **kwargs)
            return wrapper

        def commit_hook(real: Any) -> Any:
            def wrapper(dialect: Any, connection: Any) -> Any:
                key = id(getattr(connection, "dbapi_connection", connection))  # the pool's proxy -> the driver's
                if key in pending:
                    pending.discard(key)
                    self.hit("db-commit", "COMMIT")
                return real(dialect, connection)
            return wrapper

        def rollback_hook(real: Any) -> Any:
            def wrapper(dialect: Any, connection: Any) -> Any:
                pending.discard(id(getattr(connection, "dbapi_connection", connection)))
                return real(dialect, connection)
            return wrapper

        cls = sa_default.DefaultDialect
        self._patch(cls, "do_execute", statement_hook)
        self._patch(cls, "do_executemany", statement_hook)
        self._patch(cls, "do_execute_no_params", statement_hook)
        self._patch(cls, "do_commit", commit_hook)
        self._patch(cls, "do_rollback", rollback_hook)

    def __exit__(self, *exc: Any) -> None:
        while self._saved:
            owner, name, real = self._saved.pop()
            setattr(owner, name, real)

    def kinds(self) -> Counter[str]:
        return Counter(p.kind for p in self.points)
