"""`lifelong`'s own tables on the store's database: cycles, audits, and the leases.

Every SQL statement on these tables is here: the cycle rows (:func:`start_cycle`,
:func:`finish_cycle`), the audit rows (:func:`record_audit`, :func:`is_audited`) and the lease
(:func:`no_cycle_running` holds it for a user command that would pull data from under a cycle).

The lease is one row per name: a second cycle (another process, the scheduler, the CLI)
finds it held and waits or refuses with the holder's name. An expired lease (its holder died
without releasing it) is taken over; so, at once, is a lease whose holder is a dead process
of this host (:func:`holder_dead`: no such pid, a zombie, or the pid reused by a younger
process), and :func:`recover_cycles` closes the cycle rows such a process left 'running'.
Works on any SQLAlchemy database: it relies only on a primary-key insert conflict and
conditional UPDATE/DELETE. On a database server shared by
hosts (PostgreSQL) lease times are the server's clock, so hosts with skewed clocks agree on
when a lease expires; on SQLite (one host) they are this host's.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from sqlalchemy import JSON, Connection, DateTime, Engine, Float, Integer, String, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from expert_store import write_begin

from .errors import LifelongError

if TYPE_CHECKING:
    from expert_store import ExpertStore

__all__ = [
    "Base", "CycleRow", "AuditRow", "LeaseRow", "Lease", "LeaseHeldError", "create_tables", "holder_name", "utcnow",
    "start_cycle", "finish_cycle", "record_audit", "is_audited", "CycleRunningError", "no_cycle_running", "holder_dead",
    "release_dead_leases", "recover_cycles",
]

log = logging.getLogger("lifelong.records")


class Base(DeclarativeBase):
    pass


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


class CycleRow(Base):
    __tablename__ = "lifelong_cycles"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    stream: Mapped[str] = mapped_column(String(128))
    policy: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16))  # running | committed | candidate | failed | interrupted | abandoned
    started_at: Mapped[datetime] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    parent_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    holder: Mapped[str] = mapped_column(String(256))
    detail: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class AuditRow(Base):
    __tablename__ = "lifelong_audits"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    version: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    queries: Mapped[int] = mapped_column(Integer)
    recall: Mapped[float] = mapped_column(Float)
    report: Mapped[dict[str, Any]] = mapped_column(JSON)


class LeaseRow(Base):
    __tablename__ = "lifelong_leases"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(256))
    acquired_at: Mapped[datetime] = mapped_column(DateTime)
    expires_at: Mapped[datetime] = mapped_column(DateTime)


def lease_clock(conn: Connection) -> datetime:
    """Now, naive UTC, by the clock every holder shares: the server's (SQLite: this host's)."""
    if conn.dialect.name == "sqlite":
        return utcnow()
    return conn.execute(select(func.now())).scalar_one().astimezone(timezone.utc).replace(tzinfo=None)


def create_tables(engine: Engine) -> None:
    Base.metadata.create_all(engine)


Outcome = Callable[[int], "tuple[str, int, dict[str, Any]] | None"]


def committed_outcome(store: ExpertStore) -> Outcome:
    """``outcome(cycle id)``: ``(status, version, detail)`` when the cycle's version is in the
    store (committed to HEAD, or kept as ``candidate/<id>``), else None."""
    versions: dict[int, int] | None = None

    def outcome(cycle_id: int) -> tuple[str, int, dict[str, Any]] | None:
        nonlocal versions
        if versions is None:
            versions = {int(v.metrics["cycle"]): v.id for v in store.versions() if isinstance(v.metrics.get("cycle"), int)}
        if cycle_id not in versions:
            return None
        ref = f"candidate/{cycle_id}"
        kept = any(r.name == ref and r.version_id == versions[cycle_id] for r in store.refs())
        return ("candidate" if kept else "committed", versions[cycle_id], {"ref": ref if kept else "HEAD"})

    return outcome


def start_cycle(engine: Engine, *, stream: str, policy: str, parent: int, holder: str, outcome: Outcome | None = None) -> int:
    """Insert a 'running' cycle row and return its id. Call it holding the cycle lease: any
    other 'running' row then belongs to a process that died holding it (SIGKILL, power
    loss) before recording an outcome: it is closed first, as 'committed'/'candidate' when
    ``outcome`` finds its version (it died between its commit and its row's update), else
    as 'abandoned'."""
    create_tables(engine)
    with write_begin(engine) as conn:
        for (row_id,) in conn.execute(select(CycleRow.id).where(CycleRow.status == "running")).all():
            found = outcome(row_id) if outcome is not None else None
            status, version, detail = (found[0], found[1], {**found[2], "recovered": "its process died after its commit"}) if found \
                else ("abandoned", None, {"error": "its process died before recording an outcome"})
            conn.execute(update(CycleRow).where(CycleRow.id == row_id)
                         .values(status=status, finished_at=utcnow(), version=version, detail=detail))
        return int(conn.execute(
            insert(CycleRow).values(stream=stream, policy=policy, status="running", started_at=utcnow(), parent_version=parent, holder=holder)
        ).inserted_primary_key[0])


def finish_cycle(engine: Engine, cycle_id: int, status: str, *, version: int | None = None, detail: dict[str, Any] | None = None) -> None:
    """Record a cycle's outcome: committed | candidate | failed | interrupted."""
    with write_begin(engine) as conn:
        conn.execute(update(CycleRow).where(CycleRow.id == cycle_id).values(status=status, finished_at=utcnow(), version=version, detail=detail))


def record_audit(engine: Engine, version: int, queries: int, recall: float, report: dict[str, Any]) -> None:
    create_tables(engine)
    with write_begin(engine) as conn:
        conn.execute(insert(AuditRow).values(version=version, created_at=utcnow(), queries=queries, recall=recall, report=report))


def is_audited(engine: Engine, version: int) -> bool:
    create_tables(engine)
    with engine.connect() as conn:
        return conn.execute(select(AuditRow.id).where(AuditRow.version == version)).first() is not None


def holder_name(role: str = "cli") -> str:
    return f"{role}:{socket.gethostname()}:{os.getpid()}"


_HOLDER = re.compile(r"^(?P<role>.+):(?P<host>[^:]+):(?P<pid>\d+)$")
# A pid that started this long after the holder was last known alive is another process. Wide:
# /proc start times are whole seconds (btime) and move with any step of the wall clock, and a pid
# reused sooner only means waiting for the lease's expiry.
PID_START_SLACK_S = 60.0


def holder_dead(holder: str, alive_at: datetime) -> str | None:
    """Why ``holder`` (a :func:`holder_name`) is a process of this host that is gone, or None
    when it may be alive or runs elsewhere. ``alive_at`` (naive UTC, this host's clock): a
    moment the holder was alive (when it took its lease); a process now under its pid that
    started later is another one. Assumes one process table per host name (containers
    sharing a store have their own host names)."""
    m = _HOLDER.match(holder)
    if m is None or m["host"] != socket.gethostname():
        return None
    pid = int(m["pid"])
    if pid == os.getpid():
        return None
    alive, started = _process(pid)
    if not alive:
        return f"no process {pid} on this host"
    if started is not None and started > alive_at.replace(tzinfo=timezone.utc).timestamp() + PID_START_SLACK_S:
        return f"pid {pid} now belongs to a process started at {datetime.fromtimestamp(started, timezone.utc):%H:%M:%S} UTC"
    return None


def _process(pid: int) -> tuple[bool, float | None]:
    """(alive, start time as a Unix time or None where unknown) of ``pid``; a zombie is dead."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        with open("/proc/stat") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith("btime "))
    except FileNotFoundError:
        if os.path.isdir("/proc/self"):
            return False, None
    except (OSError, StopIteration, ValueError):
        pass
    else:
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state is field 3, starttime field 22
        if fields[0] in ("Z", "X"):
            return False, None
        return True, btime + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    try:  # no /proc: existence only
        os.kill(pid, 0)
    except ProcessLookupError:
        return False, None
    except OSError:
        pass  # EPERM: it exists
    return True, None


def release_dead_leases(engine: Engine) -> list[str]:
    """Delete the leases held by dead processes of this host; one line per lease released."""
    create_tables(engine)
    with engine.connect() as conn:
        names = list(conn.execute(select(LeaseRow.name)).scalars())
    return [line for name in names if (line := _release_if_dead(engine, name))]


def _release_if_dead(engine: Engine, name: str) -> str | None:
    """Delete lease ``name`` if its holder is a dead process of this host; what was done, or None."""
    with engine.connect() as conn:
        offset = lease_clock(conn) - utcnow()  # lease times are the database's clock (PostgreSQL: the server's)
        row = conn.execute(select(LeaseRow).where(LeaseRow.name == name)).first()
    why = holder_dead(row.holder, row.acquired_at - offset) if row is not None else None
    if why is None:
        return None
    # A transaction of its own that writes first (SQLite refuses at once one that read before a
    # concurrent commit); it deletes only the lease read above, not one taken since.
    with write_begin(engine) as conn:
        if not conn.execute(delete(LeaseRow).where(LeaseRow.name == name, LeaseRow.holder == row.holder,
                                                   LeaseRow.acquired_at == row.acquired_at)).rowcount:
            return None
    line = f"lease '{name}' of {row.holder} released: its holder is dead ({why})"
    log.info("%s", line)
    return line


def recover_cycles(engine: Engine, outcome: Outcome) -> list[tuple[int, str]]:
    """Close the cycle rows left 'running' by dead processes of this host. ``outcome(id)``
    is ``(status, version, detail)`` when the cycle's version was committed (its process died
    between its commit and its row's update), else None: the row becomes 'abandoned'.
    Returns ``(cycle id, new status)`` per row closed."""
    create_tables(engine)
    with engine.connect() as conn:
        rows = conn.execute(select(CycleRow).where(CycleRow.status == "running")).all()
    closed = []
    for row in rows:
        why = holder_dead(row.holder, row.started_at)
        if why is None:
            continue
        found = outcome(row.id)
        if found is None:
            status, version, detail = "abandoned", None, {"error": f"its process died before recording an outcome ({why})"}
        else:
            status, version, detail = found[0], found[1], {**found[2], "recovered": f"its process died after its commit ({why})"}
        with write_begin(engine) as conn:  # only if still 'running': a concurrent recovery or cycle start wins
            n = conn.execute(update(CycleRow).where(CycleRow.id == row.id, CycleRow.status == "running")
                             .values(status=status, finished_at=utcnow(), version=version, detail=detail)).rowcount
        if n:
            closed.append((row.id, status))
            log.warning("cycle %d was left running by %s (%s): now '%s'%s", row.id, row.holder, why, status,
                        f" (version {version})" if version else "")
    return closed


class LeaseHeldError(LifelongError):
    """Another cycle holds the lease."""

    hint = ("wait for it to finish (or pass --wait SECONDS); a killed holder's lease is taken over at once on its own host, "
            "and expires by itself elsewhere")


@dataclass
class Lease:
    """A named, expiring database lease. Use as a context manager."""

    engine: Engine
    name: str = "cycle"
    holder: str = ""
    ttl_s: float = 300.0
    wait_s: float = 0.0
    poll_s: float = 0.5

    def __post_init__(self) -> None:
        self.holder = self.holder or holder_name()
        self.lost: LeaseHeldError | None = None  # set by keep_alive when a renewal failed
        create_tables(self.engine)

    def acquire(self) -> None:
        deadline = time.monotonic() + self.wait_s
        while True:
            with write_begin(self.engine) as conn:
                now = lease_clock(conn)
                conn.execute(delete(LeaseRow).where(LeaseRow.name == self.name, LeaseRow.expires_at < now))
            try:
                with write_begin(self.engine) as conn:
                    conn.execute(
                        insert(LeaseRow).values(
                            name=self.name, holder=self.holder, acquired_at=now, expires_at=now + timedelta(seconds=self.ttl_s)
                        )
                    )
                return
            except IntegrityError:
                pass
            if _release_if_dead(self.engine, self.name):  # its holder was killed: no need to wait for the expiry
                continue
            if time.monotonic() >= deadline:
                with self.engine.connect() as conn:
                    row = conn.execute(select(LeaseRow).where(LeaseRow.name == self.name)).first()
                who = f"{row.holder} since {row.acquired_at:%Y-%m-%d %H:%M:%S} UTC" if row else "another process"
                raise LeaseHeldError(f"another cycle is running on this store ({who}); nothing was done")
            time.sleep(self.poll_s)

    def renew(self) -> None:
        """Extend the lease; raises if it was lost (expired and taken by someone else)."""
        with write_begin(self.engine) as conn:
            n = conn.execute(
                update(LeaseRow)
                .where(LeaseRow.name == self.name, LeaseRow.holder == self.holder)
                .values(expires_at=lease_clock(conn) + timedelta(seconds=self.ttl_s))
            ).rowcount
        if n != 1:
            raise LeaseHeldError(f"the '{self.name}' lease of {self.holder} was lost")

    def release(self) -> None:
        with write_begin(self.engine) as conn:
            conn.execute(delete(LeaseRow).where(LeaseRow.name == self.name, LeaseRow.holder == self.holder))

    @contextmanager
    def keep_alive(self, every_s: float | None = None, on_lost: Callable[[LeaseHeldError], None] | None = None) -> Iterator[None]:
        """Renew the lease from a background thread every ``every_s`` (default ttl / 3) while
        inside. A failed renewal (the lease expired and someone else took it) sets
        :attr:`lost` and calls ``on_lost`` once; renewing stops then."""
        done = threading.Event()
        interval = min(every_s or self.ttl_s, self.ttl_s / 3)

        def beat() -> None:
            while not done.wait(interval):
                try:
                    self.renew()
                except LeaseHeldError as exc:
                    self.lost = exc
                    if on_lost is not None:
                        on_lost(exc)
                    return
                except SQLAlchemyError as exc:  # disk full, I/O error: try again next beat (the lease lasts ttl_s)
                    log.warning("renewing the '%s' lease failed (%s); retrying", self.name,
                                (str(exc).splitlines() or [type(exc).__name__])[0])

        thread = threading.Thread(target=beat, name=f"lease-{self.name}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class CycleRunningError(LifelongError):
    """A cycle holds the store's ``cycle`` lease, and what was asked would change data it reads."""


@contextmanager
def no_cycle_running(engine: Engine, refused: str, role: str = "cli") -> Iterator[None]:
    """Hold the ``cycle`` lease while inside: no cycle runs meanwhile. When one runs already,
    raise :class:`CycleRunningError` naming it, ending with ``refused`` (what was not done)."""
    lease = Lease(engine, "cycle", holder=holder_name(role))
    try:
        lease.acquire()
    except LeaseHeldError:
        with engine.connect() as conn:
            row = conn.execute(select(CycleRow).where(CycleRow.status == "running").order_by(CycleRow.id.desc())).first()
            held = conn.execute(select(LeaseRow).where(LeaseRow.name == "cycle")).first()
        who = f"{held.holder} since {held.acquired_at:%Y-%m-%d %H:%M:%S} UTC" if held else "another process"
        what = f"cycle {row.id} is training stream '{row.stream}'" if row else "a cycle is starting"
        raise CycleRunningError(f"{what} ({who}): {refused}") from None
    try:
        yield
    finally:
        lease.release()
