"""`lifelong`'s own tables on the store's database: cycles, audits, and the leases.

Every SQL statement on these tables is here: the cycle rows (:func:`start_cycle`,
:func:`finish_cycle`), the audit rows (:func:`record_audit`, :func:`is_audited`) and the lease
(:func:`no_cycle_running` holds it for a user command that would pull data from under a cycle).

The lease is one row per name: a second cycle (another process, the scheduler, the CLI)
finds it held and waits or refuses with the holder's name. An expired lease (its holder died
without releasing it) is taken over. Works on any SQLAlchemy database: it relies only on a
primary-key insert conflict and conditional UPDATE/DELETE. On a database server shared by
hosts (PostgreSQL) lease times are the server's clock, so hosts with skewed clocks agree on
when a lease expires; on SQLite (one host) they are this host's.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import JSON, Connection, DateTime, Engine, Float, Integer, String, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from .errors import LifelongError

__all__ = [
    "Base", "CycleRow", "AuditRow", "LeaseRow", "Lease", "LeaseHeldError", "create_tables", "holder_name", "utcnow",
    "start_cycle", "finish_cycle", "record_audit", "is_audited", "CycleRunningError", "no_cycle_running",
]


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


def start_cycle(engine: Engine, *, stream: str, policy: str, parent: int, holder: str) -> int:
    """Insert a 'running' cycle row and return its id. Call it holding the cycle lease: any
    other 'running' row then belongs to a process that died holding it (SIGKILL, power
    loss) before recording an outcome, and is marked 'abandoned' in the same transaction."""
    create_tables(engine)
    with engine.begin() as conn:
        conn.execute(
            update(CycleRow)
            .where(CycleRow.status == "running")
            .values(status="abandoned", finished_at=utcnow(), detail={"error": "its process died before recording an outcome"})
        )
        return int(conn.execute(
            insert(CycleRow).values(stream=stream, policy=policy, status="running", started_at=utcnow(), parent_version=parent, holder=holder)
        ).inserted_primary_key[0])


def finish_cycle(engine: Engine, cycle_id: int, status: str, *, version: int | None = None, detail: dict[str, Any] | None = None) -> None:
    """Record a cycle's outcome: committed | candidate | failed | interrupted."""
    with engine.begin() as conn:
        conn.execute(update(CycleRow).where(CycleRow.id == cycle_id).values(status=status, finished_at=utcnow(), version=version, detail=detail))


def record_audit(engine: Engine, version: int, queries: int, recall: float, report: dict[str, Any]) -> None:
    create_tables(engine)
    with engine.begin() as conn:
        conn.execute(insert(AuditRow).values(version=version, created_at=utcnow(), queries=queries, recall=recall, report=report))


def is_audited(engine: Engine, version: int) -> bool:
    create_tables(engine)
    with engine.connect() as conn:
        return conn.execute(select(AuditRow.id).where(AuditRow.version == version)).first() is not None


def holder_name(role: str = "cli") -> str:
    return f"{role}:{socket.gethostname()}:{os.getpid()}"


class LeaseHeldError(LifelongError):
    """Another cycle holds the lease."""

    hint = "wait for it to finish (or pass --wait SECONDS); a dead holder's lease expires by itself"


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
            with self.engine.begin() as conn:
                now = lease_clock(conn)
                conn.execute(delete(LeaseRow).where(LeaseRow.name == self.name, LeaseRow.expires_at < now))
            try:
                with self.engine.begin() as conn:
                    conn.execute(
                        insert(LeaseRow).values(
                            name=self.name, holder=self.holder, acquired_at=now, expires_at=now + timedelta(seconds=self.ttl_s)
                        )
                    )
                return
            except IntegrityError:
                pass
            if time.monotonic() >= deadline:
                with self.engine.connect() as conn:
                    row = conn.execute(select(LeaseRow).where(LeaseRow.name == self.name)).first()
                who = f"{row.holder} since {row.acquired_at:%Y-%m-%d %H:%M:%S} UTC" if row else "another process"
                raise LeaseHeldError(f"another cycle is running on this store ({who}); nothing was done")
            time.sleep(self.poll_s)

    def renew(self) -> None:
        """Extend the lease; raises if it was lost (expired and taken by someone else)."""
        with self.engine.begin() as conn:
            n = conn.execute(
                update(LeaseRow)
                .where(LeaseRow.name == self.name, LeaseRow.holder == self.holder)
                .values(expires_at=lease_clock(conn) + timedelta(seconds=self.ttl_s))
            ).rowcount
        if n != 1:
            raise LeaseHeldError(f"the '{self.name}' lease of {self.holder} was lost")

    def release(self) -> None:
        with self.engine.begin() as conn:
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
