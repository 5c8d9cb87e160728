"""I/O fault injection, exhaustively: make the Nth filesystem or database write fail.

An :class:`Injector`, while active, stands in for the Python-level calls through which the
project writes — ``os.open`` (to create or write, or of a directory to fsync it),
``os.write``, ``write``/``writelines``/``flush`` of files opened for writing with
``open``/``io.open``/``os.fdopen``, ``os.fsync``/``fdatasync``, ``os.replace``/``rename``,
``os.mkdir`` (of a path not there yet), ``os.unlink``/``remove``/``rmdir``,
``os.chmod``/``fchmod``/``utime`` — and for the database every INSERT/UPDATE/DELETE/DDL
statement and the COMMIT of every transaction that wrote (patched in SQLAlchemy's dialect,
so every engine is covered). Each call is an *injection point*; call number ``fail_at``
raises ``OSError(ENOSPC or EIO)``, or ``sqlite3.OperationalError`` with SQLite's own text
("database or disk is full", "disk I/O error"), which SQLAlchemy wraps as it would the
real thing. Only calls of the thread that activated the injector and of the store's
object-writer threads count (a lease's keep-alive thread runs on its own clock).

:func:`sweep` runs an :class:`Operation` on a fresh copy of its prepared world with the
fault at N = 1, 2, … until a run completes with no failure left to inject. After every
injected failure it checks (see :func:`_after_fault`):

- the world's state (refs, versions, HEAD's cursors, staged data) is the one before the
  operation or the one after it (from a fault-free run), never in between; ``verify``
  finds nothing; HEAD's version loads in full;
- the error reached the user as one line in their words: a CLI operation exits 1 with one
  ``error: …`` line on stderr and no traceback; an API operation raises an error the CLI
  prints that way; the line names the failure ("disk full" / "I/O error") and says the
  operation left nothing changed when it did (``Operation.unchanged``);
- the next attempt, with the fault gone, succeeds and reaches the state after; then
  ``lifelong gc --grace 0`` leaves no temp file, probe, temp directory or unreachable
  object anywhere in the store.

Used by ``tests/*/test_*faults.py`` (a sample of points) and ``scripts/fault_inject.py``
(every point, ENOSPC and EIO).
"""

from __future__ import annotations

import builtins
import contextlib
import errno as errno_module
import io
import json
import os
import shutil
import sqlite3
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from sqlalchemy.engine import default as sa_default

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("expert_store", "streams", "lifelong")
ERRNOS = {"ENOSPC": errno_module.ENOSPC, "EIO": errno_module.EIO}
WORDS = {errno_module.ENOSPC: "disk full", errno_module.EIO: "I/O error"}
SQLITE_TEXT = {errno_module.ENOSPC: "database or disk is full", errno_module.EIO: "disk I/O error"}
_DB_WRITES = ("INSERT", "UPDATE", "DELETE", "CREATE", "ALTER", "DROP", "REPLACE")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_COUNTED_THREADS = ("expert-store-write",)
NOTHING_CHANGED = "nothing was changed"  # what any operation may say when opening the store failed


# ----------------------------------------------------------------------------- the injector


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


# ----------------------------------------------------------------------------- operations


@dataclass
class Outcome:
    """How a run ended: the exception of an API call, or a CLI run's exit code and stderr."""

    error: BaseException | None = None
    rc: int | None = None
    stdout: str = ""
    stderr: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None and (self.rc is None or self.rc == 0)

    def message(self) -> str:
        if self.rc is not None:
            return self.stderr.strip()
        return "" if self.error is None else str(self.error)


@dataclass
class Operation:
    """An operation to break: a world to prepare once, a run, and how to read its state.

    ``run(world, injector)`` performs the operation on a copy of the prepared world with the
    injector active (it may leave ``injector.armed`` False until the step to break).
    ``state(world)`` is what must be the before or the after state; ``final(world)`` (default
    ``state``) what a successful retry must reach. ``unchanged`` is what the error says when
    the operation left the state as it was ("nothing was committed").
    """

    name: str
    prepare: Callable[[Path], None]
    run: Callable[[Path, Injector], Outcome]
    unchanged: str
    state: Callable[[Path], Any] = None  # type: ignore[assignment]
    final: Callable[[Path], Any] | None = None
    cli: bool = False
    warm_up: bool = True  # run once before counting (lazy imports, caches)

    def __post_init__(self) -> None:
        self.state = self.state or store_state
        self.final = self.final or self.state


def store_path(world: Path) -> Path:
    return world / "store"


def cli(world: Path, *argv: str) -> Outcome:
    """``lifelong --store WORLD/store ARGV`` in this process; exit code, stdout and stderr."""
    from lifelong.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(["--store", str(store_path(world)), *argv])
    except SystemExit as exc:  # argparse
        rc = int(exc.code or 0)
    except BaseException:  # noqa: BLE001 - what the user would see: a traceback
        return Outcome(rc=1, stdout=out.getvalue(), stderr=err.getvalue() + traceback.format_exc())
    return Outcome(rc=rc, stdout=out.getvalue(), stderr=err.getvalue())


def api(call: Callable[[], Any]) -> Outcome:
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - judged by the checks
        return Outcome(error=exc)
    return Outcome()


def _open(world: Path):
    from expert_store import ExpertStore

    return ExpertStore.open(store_path(world))


def store_state(world: Path) -> dict[str, Any]:
    """Refs, versions (id, parent, shard count, cursors, new_docs) and staged data."""
    from sqlalchemy import inspect, select

    store = _open(world)
    try:
        state: dict[str, Any] = {
            "refs": sorted((r.name, r.version_id, r.kind) for r in store.refs()),
            "versions": [(v.id, v.parent, len(v.shards), json.dumps(v.cursors, sort_keys=True),
                          v.metrics.get("new_docs")) for v in store.versions()],
        }
        if inspect(store.engine).has_table("stream_staged"):
            from streams.schema import stream_staged

            with store.engine.connect() as conn:
                rows = conn.execute(select(stream_staged.c.stream, stream_staged.c.key, stream_staged.c.to_cursor,
                                           stream_staged.c.summary)).all()
            state["staged"] = sorted((r.stream, r.key, json.dumps(r.to_cursor, sort_keys=True),
                                      r.summary.get("train_docs")) for r in rows)
        return state
    finally:
        store.close()


def objects_state(world: Path) -> dict[str, Any]:
    """:func:`store_state` plus every object and temp file under ``objects/`` (gc's work)."""
    objects = store_path(world) / "objects"
    files = sorted(str(p.relative_to(objects)) for p in objects.rglob("*") if p.is_file())
    return {**store_state(world), "files": files}


def _no_store(world: Path) -> bool:
    return not (store_path(world) / "store.json").exists()


def init_state(world: Path) -> Any:
    """:func:`store_state`, or what lies where the store would be when there is none."""
    if _no_store(world):
        root = store_path(world)
        return {"no store": sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else None}
    return store_state(world)


def invariants(world: Path) -> list[str]:
    """``verify`` finds nothing, HEAD's version loads in full (every object re-hashed), and a
    next cycle (another process) could take the cycle lease."""
    from sqlalchemy import inspect

    problems: list[str] = []
    if _no_store(world):
        return problems
    store = _open(world)
    try:
        if inspect(store.engine).has_table("lifelong_leases"):
            from lifelong.records import Lease, LeaseHeldError, holder_name

            lease = Lease(store.engine, "cycle", holder=holder_name("next"))
            try:
                lease.acquire()
                lease.release()
            except LeaseHeldError as exc:
                problems.append(f"the next cycle cannot start: {exc}")
        problems += [f"verify: {p}" for p in store.verify()]
        head = store.head()
        if head is not None:
            version = store.version(head)
            for shard in version.shards:
                store.load_shard(shard)
            store.load_dense(head)
            store.load_optimizer(head)
    except Exception as exc:  # noqa: BLE001
        problems.append(f"HEAD does not load: {type(exc).__name__}: {exc}")
    finally:
        store.close()
    return problems


def leftovers(world: Path) -> list[str]:
    """Run ``lifelong gc --grace 0``; then whatever temp file, probe, temp directory or
    unreachable object is still in the store."""
    if _no_store(world):
        return []
    out = cli(world, "gc", "--grace", "0")
    found = [] if out.ok else [f"gc --grace 0 failed: {out.message()}"]
    root = store_path(world)
    for path in root.rglob("*"):
        name = path.name
        if ".tmp-" in name or name.startswith(".write-probe-") or name.endswith(".tmp") or \
                (path.is_dir() and path.parent.name == "streams" and name.startswith("streams-")):
            found.append(f"left behind: {path.relative_to(root)}")
    from expert_store.maintenance import referenced_objects
    from sqlalchemy.orm import Session

    store = _open(world)
    try:
        with Session(store.engine) as session:
            keep = set(referenced_objects(session))
        found += [f"unreachable object left: {h}" for h in set(store.objects.hashes()) - keep]
    finally:
        store.close()
    return found


# ----------------------------------------------------------------------------- the sweep


@dataclass
class Report:
    """One operation swept with one errno."""

    operation: str
    errno: str
    points: int = 0  # injection points of a fault-free run
    kinds: dict[str, int] = field(default_factory=dict)
    where: list[str] = field(default_factory=list)  # every point of the fault-free run
    injected: int = 0  # runs in which the fault fired
    tolerated: int = 0  # ... and the operation still succeeded (a best-effort step)
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failures


def _fresh(template: Path, where: Path) -> Path:
    if where.exists():
        shutil.rmtree(where)
    shutil.copytree(template, where, symlinks=True)
    return where


def _short(text: str, n: int = 300) -> str:
    """A long message's head and tail (a traceback's last line is what it is about)."""
    text = text.strip()
    return text if len(text) <= n else f"{text[: n // 2]} … {text[-n // 2:]}"


def _message_problems(op: Operation, out: Outcome, errno: int, unchanged: bool) -> list[str]:
    from lifelong.cli.main import USER_ERRORS

    problems: list[str] = []
    if op.cli:
        lines = out.stderr.strip().splitlines()
        if out.rc != 1:
            problems.append(f"exit code {out.rc}, expected 1")
        if "Traceback" in out.stderr:
            problems.append("a traceback reached the user")
        if len(lines) != 1 or not lines[0].startswith("error: "):
            problems.append(f"stderr is not one 'error: ...' line: {_short(out.stderr)!r}")
    else:
        if not isinstance(out.error, USER_ERRORS):
            problems.append(f"raised {type(out.error).__name__} (the CLI would print a traceback): {out.error}")
        elif "\n" in str(out.error):
            problems.append(f"the message is not one line: {out.error!r}")
    text = out.message()
    if WORDS[errno] not in text:
        problems.append(f"the message does not say {WORDS[errno]!r}: {_short(text)!r}")
    says_unchanged = op.unchanged in text or NOTHING_CHANGED in text
    if unchanged and not says_unchanged:
        problems.append(f"the state is unchanged but the message does not say {op.unchanged!r}: {_short(text)!r}")
    if not unchanged and says_unchanged:
        problems.append(f"the operation took effect but the message says it did not: {_short(text)!r}")
    return problems


def _after_fault(op: Operation, world: Path, out: Outcome, inj: Injector, before: Any, after: Any,
                 final_after: Any) -> tuple[list[str], bool]:
    """The checks after one injected failure; (problems, whether the run still succeeded)."""
    problems: list[str] = []
    state = op.state(world)
    if state != before and state != after:
        problems.append(f"state in between: {state} (before {before}, after {after})")
    problems += invariants(world)
    if out.ok:  # the fault was absorbed (a best-effort step): fine if the operation took effect
        if state != after:
            problems.append("the operation reported success but did not take effect")
        problems += leftovers(world)
        return problems, True
    problems += _message_problems(op, out, inj.errno, unchanged=state == before)
    if state == before:
        retry = op.run(world, Injector(None))
        if not retry.ok:
            problems.append(f"the retry failed: {retry.message()[:600]}")
    problems += leftovers(world)  # gc first: the final state of gc's own sweep counts files
    if state == before and op.final(world) != final_after:
        problems.append(f"the retry reached {op.final(world)}, expected {final_after}")
    problems += invariants(world)
    return problems, False


def first_of_each(points: list[Point], key: Callable[[Point], Any]) -> set[int]:
    """Numbers of the first point of each ``key`` (e.g. kind; None: no key), and of the last point."""
    seen: dict[Any, int] = {}
    for point in points:
        if (k := key(point)) is not None:
            seen.setdefault(k, point.n)
    return set(seen.values()) | ({points[-1].n} if points else set())


def sweep(op: Operation, errno: int, *, work: Path | None = None, only: Callable[[int], bool] | None = None,
          sample: Callable[[Point], Any] | None = None, max_points: int = 10_000,
          log: Callable[[str], None] | None = None) -> Report:
    """Fail injection point N = 1, 2, … of ``op`` with ``errno`` until a run completes with no
    failure left to inject; check every failed run (see the module doc). ``only(n)``
    restricts the points tried; ``sample`` tries only the first point of each
    ``sample(point)`` of the fault-free run (``lambda p: p.kind``: one of each kind), and
    the last (a sample, for the test suite)."""
    name = next(k for k, v in ERRNOS.items() if v == errno)
    report = Report(op.name, name)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"faults-{op.name}-", dir=work) as tmp:
        template = Path(tmp) / "template"
        template.mkdir()
        op.prepare(template)
        before = op.state(template)
        reference = _fresh(template, Path(tmp) / "reference")
        if op.warm_up:
            op.run(_fresh(template, reference), Injector(None))  # lazy imports, caches
        counter = Injector(None)
        out = op.run(_fresh(template, reference), counter)
        if not out.ok:
            raise RuntimeError(f"{op.name}: fails without a fault: {out.message()}")
        after, final_after = op.state(reference), op.final(reference)
        report.points, report.kinds = len(counter.points), dict(counter.kinds())
        report.where = [str(p) for p in counter.points]
        if sample is not None:
            chosen = first_of_each(counter.points, sample)
            only = chosen.__contains__ if only is None else (lambda n, keep=only: keep(n) and n in chosen)
        n = 0
        while n < max_points:
            n += 1
            if only is not None and not only(n):
                if n > report.points:
                    break
                continue
            world = _fresh(template, Path(tmp) / "world")
            inj = Injector(n, errno)
            out = op.run(world, inj)
            if inj.fired is None:
                if not out.ok:
                    report.failures.append(f"{op.name} {name} n={n}: failed with no fault left: {out.message()}")
                break
            report.injected += 1
            try:
                problems, tolerated = _after_fault(op, world, out, inj, before, after, final_after)
            except Exception as exc:  # noqa: BLE001 - a check that cannot run is a failure too
                problems, tolerated = [f"the checks crashed: {type(exc).__name__}: {exc}"], False
            report.tolerated += tolerated
            report.failures += [f"{op.name} {name} {inj.fired}: {p}" for p in problems]
            if log is not None:
                log(f"{op.name} {name} {inj.fired}: {'ok' if not problems else problems[0][:300]}")
            shutil.rmtree(world, ignore_errors=True)
    report.seconds = time.perf_counter() - start
    return report


# ----------------------------------------------------------------------------- the worlds


LAYERS = ("blocks.0.peer", "blocks.1.peer")


def _tensors(seed: int, rows: int = 2, n2: int = 4, d: int = 8) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"row_keys": torch.randn(rows, 4, generator=gen), "u": torch.randn(rows * n2, d, generator=gen),
            "v": torch.randn(rows * n2, d, generator=gen)}


def _dense(seed: int) -> dict[str, torch.Tensor]:
    return {"embed": torch.randn(16, 8, generator=torch.Generator().manual_seed(1000 + seed))}


def _first_commit(store: Any, seed: int = 0) -> Any:
    from expert_store import NewShard

    shards = [NewShard(layer, start, start + 2, 8, _tensors(seed + 10 * i + start), frozen=start == 0)
              for i, layer in enumerate(LAYERS) for start in (0, 2)]
    return store.commit(shards=shards, dense=_dense(seed), optimizer={"step": torch.tensor(seed)},
                        message=f"v{seed}", parent=None, cursors={"s": {"offset": seed}})


def _incremental_commit(store: Any, seed: int = 1) -> Any:
    from expert_store import DeltaShard, ExistingShard, NewShard

    head = store.version()
    shards: list[Any] = []
    for i, layer in enumerate(LAYERS):
        mine = [s for s in head.shards if s.layer == layer]
        shards.append(ExistingShard(mine[0].id))  # frozen: reused as is
        ids = torch.tensor([1], dtype=torch.int64)
        shards.append(DeltaShard(mine[1].id, {"u": (ids, torch.full((1, 8), float(seed)))}))  # a sparse update
        end = max(s.row_end for s in mine)
        shards.append(NewShard(layer, end, end + 2, 8, _tensors(100 + seed + i)))  # growth
    return store.commit(shards=shards, dense=_dense(seed), optimizer={"step": torch.tensor(seed)},
                        message=f"v{seed}", parent=head.id, cursors={"s": {"offset": seed}})


def _prepare_store(versions: int) -> Callable[[Path], None]:
    def prepare(world: Path) -> None:
        from expert_store import ExpertStore

        with ExpertStore.init(store_path(world), {"d_model": 8}) as store:
            if versions >= 1:
                _first_commit(store)
            for seed in range(1, versions):
                _incremental_commit(store, seed)
    return prepare


def _api_on_store(call: Callable[[Any], Any]) -> Callable[[Path, Injector], Outcome]:
    def run(world: Path, inj: Injector) -> Outcome:
        from expert_store import ExpertStore, objects

        writers, objects.WRITERS = objects.WRITERS, 1  # one writer thread: the Nth call is always the same
        try:
            with inj:
                store = ExpertStore.open(store_path(world))
                try:
                    return api(lambda: call(store))
                finally:
                    store.close()
        except Exception as exc:  # noqa: BLE001 - the open itself failed
            return Outcome(error=exc)
        finally:
            objects.WRITERS = writers
    return run


def _cli_on_store(*argv: str) -> Callable[[Path, Injector], Outcome]:
    def run(world: Path, inj: Injector) -> Outcome:
        from expert_store import objects

        writers, objects.WRITERS = objects.WRITERS, 1
        try:
            with inj:
                return cli(world, *argv)
        finally:
            objects.WRITERS = writers
    return run


def commit_first() -> Operation:
    """A store's first commit: 4 new shards (2 layers), dense weights, optimizer state."""
    return Operation("commit-first", _prepare_store(0), _api_on_store(_first_commit), "nothing was committed")


def commit_incremental() -> Operation:
    """A commit on HEAD: per layer a reused frozen shard, a delta shard and a new shard."""
    return Operation("commit-incremental", _prepare_store(1), _api_on_store(_incremental_commit),
                     "nothing was committed")


def rollback() -> Operation:
    """``lifelong rollback 1`` on a store at version 2."""
    return Operation("rollback", _prepare_store(2), _cli_on_store("rollback", "1"), "HEAD was not moved", cli=True)


def tag() -> Operation:
    """``lifelong tag good 1``."""
    return Operation("tag", _prepare_store(2), _cli_on_store("tag", "good", "1"), "no tag 'good' was made", cli=True)


def gc() -> Operation:
    """``lifelong gc``: 3 unreachable objects and a temp file, all older than the grace period."""
    def prepare(world: Path) -> None:
        from expert_store import ExpertStore

        _prepare_store(2)(world)
        with ExpertStore.open(store_path(world)) as store:
            for seed in (7, 8, 9):
                store.objects.put(_tensors(seed))
            some = store.objects.path(next(iter(store.objects.hashes())))
            (some.parent / f".{some.name}.tmp-1-dead").write_bytes(b"half an object")
        old = time.time() - 3600
        for path in (store_path(world) / "objects").rglob("*"):
            os.utime(path, (old, old))

    return Operation("gc", prepare, _cli_on_store("gc"), "no version was changed", state=store_state,
                     final=objects_state, cli=True)


STREAM_TEXT = "\n".join(f"line {i} of the stream: " + "apple banana cherry " * (i % 5 + 1) for i in range(120))


def _prepare_streams(world: Path, model: bool) -> None:
    """A store (a tiny model's, or an empty one) with stream ``a`` registered (text, 120 lines)."""
    from expert_store import ExpertStore
    from lifelong.workspace import open_registry

    src = world / "src"
    src.mkdir()
    (src / "a.txt").write_text(STREAM_TEXT)
    if model:
        from lifelong.checkpoint import init_store

        store, _ = init_store(str(store_path(world)), tiny_model_config())
    else:
        store = ExpertStore.init(store_path(world), {})
        _first_commit(store)
    open_registry(store, progress=False).add("a", str(src / "a.txt"))
    store.close()


def ingest() -> Operation:
    """``lifelong ingest a``: read, tokenize and stage a stream's new data (no cursor moves)."""
    return Operation("ingest", lambda world: _prepare_streams(world, model=False), _cli_on_store("ingest", "a"),
                     "nothing was staged", cli=True)


def tiny_model_config():
    from lifelong.config import ModelConfig, PEERConfig

    peer = PEERConfig(d_model=32, heads=2, top_k=4, d_key=16, n_rows=8, n_cols=8)
    return ModelConfig(d_model=32, n_layers=2, n_heads=2, block_size=64, peer=peer)


def _cycle_run(world: Path, inj: Injector) -> Outcome:
    """One cycle on stream ``a``; faults are injected from its commit on (the commit, its
    cursor move, and what the cycle does after it)."""
    import lifelong.cycle as cycle_module
    from expert_store import ExpertStore, objects
    from lifelong.config import CycleConfig, TrainConfig
    from lifelong.workspace import open_registry

    cfg = CycleConfig(policy="freeze-experts", grow_rows=2, token_budget=2000, eval_tokens=512,
                      train=TrainConfig(batch_size=8))
    real_commit = cycle_module.commit_model
    writers = objects.WRITERS

    def commit_model(*args: Any, **kwargs: Any) -> Any:
        inj.armed = True
        return real_commit(*args, **kwargs)

    store = ExpertStore.open(store_path(world))
    try:
        registry = open_registry(store, progress=False)
        inj.armed = False
        cycle_module.commit_model, objects.WRITERS = commit_model, 1
        with inj:
            return api(lambda: cycle_module.run_cycle(store, registry, "a", cfg, device="cpu", progress=False,
                                                      log=lambda line: None, holder=_gone_holder()))
    finally:
        cycle_module.commit_model, objects.WRITERS = real_commit, writers
        store.close()


def _gone_holder() -> str:
    """A cycle holder name of this host whose process has ended: as in a CLI run, the next
    attempt comes from another process (which may release a lease its release left behind)."""
    import socket
    import subprocess

    child = subprocess.Popen(["true"])
    child.wait()
    return f"cli:{socket.gethostname()}:{child.pid}"


def cycle() -> Operation:
    """A growth cycle's commit with its cursor move (``run_cycle`` on a tiny model)."""
    return Operation("cycle-commit", lambda world: _prepare_streams(world, model=True), _cycle_run,
                     "nothing was committed", warm_up=False)  # armed at the commit: the cycle has imported all


TINY_INIT = ("--d-model", "32", "--layers", "2", "--rows", "8", "--cols", "8", "--heads", "2", "--top-k", "4",
             "--d-key", "16")


def init() -> Operation:
    """``lifelong init`` of a tiny model: the store's creation and its first commit."""
    return Operation("init", lambda world: None, _cli_on_store("init", *TINY_INIT), "no store was created",
                     state=init_state, cli=True)


OPERATIONS: dict[str, Callable[[], Operation]] = {
    "commit-first": commit_first,
    "commit-incremental": commit_incremental,
    "ingest": ingest,
    "cycle-commit": cycle,
    "gc": gc,
    "rollback": rollback,
    "tag": tag,
    "init": init,
}
