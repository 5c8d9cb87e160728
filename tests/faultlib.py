"""I/O fault injection, exhaustively: make the Nth filesystem or database write fail.

The :class:`~faultinject.Injector` (``tests/faultinject.py``) makes call number N of the
project's writes — file opens, writes, fsyncs, renames, mkdirs, unlinks, chmods, and the
database's write statements and commits — fail with ``ENOSPC`` or ``EIO`` (SQLite's own
"database or disk is full" / "disk I/O error" for the database). The operations to break
and their worlds are in ``tests/faultops.py``.

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

import contextlib
import io
import json
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from faultinject import ERRNOS, Injector, Point

__all__ = ["ERRNOS", "Injector", "Point", "Outcome", "Operation", "Report", "sweep", "first_of_each", "cli", "api",
           "store_path", "store_state", "objects_state", "init_state", "invariants", "leftovers"]

WORDS = {ERRNOS["ENOSPC"]: "disk full", ERRNOS["EIO"]: "I/O error"}
NOTHING_CHANGED = "nothing was changed"  # what any operation may say when opening the store failed


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
