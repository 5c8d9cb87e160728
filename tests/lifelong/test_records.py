"""lifelong's tables: cycle rows (abandoned runs), audit rows, and the expiring lease, on SQLite and
PostgreSQL (the lease across processes: test_shared_store.py)."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlalchemy import Engine, create_engine, select, update

from expert_store.schema import make_engine
from lifelong.records import (
    AuditRow,
    CycleRow,
    Lease,
    LeaseHeldError,
    LeaseRow,
    finish_cycle,
    holder_name,
    is_audited,
    record_audit,
    start_cycle,
    utcnow,
)

from backends import Backend


@pytest.fixture
def engine(backend: Backend) -> Iterator[Engine]:
    """The tables' database: SQLite or PostgreSQL (every test here runs on both)."""
    engine = create_engine(backend.engine_url("records.db"))
    yield engine
    engine.dispose()


def cycles(engine: Engine) -> list:
    with engine.connect() as conn:
        return list(conn.execute(select(CycleRow.__table__).order_by(CycleRow.id)))


def lease_row(engine: Engine, name: str = "cycle"):
    with engine.connect() as conn:
        return conn.execute(select(LeaseRow.__table__).where(LeaseRow.name == name)).first()


# ---------------------------------------------------------------------------- cycles
def test_start_cycle_marks_an_older_running_row_abandoned(engine):
    first = start_cycle(engine, stream="a", policy="full", parent=1, holder="cli:h:1")
    (row,) = cycles(engine)
    assert (row.id, row.stream, row.policy, row.status, row.parent_version, row.holder) == (first, "a", "full", "running", 1, "cli:h:1")
    assert row.finished_at is None and row.version is None
    second = start_cycle(engine, stream="b", policy="freeze-all", parent=1, holder="cli:h:2")  # the first one died
    old, new = cycles(engine)
    assert second > first
    assert old.status == "abandoned" and old.finished_at is not None and "died" in old.detail["error"]
    assert new.status == "running" and new.stream == "b"


def test_start_cycle_closes_a_dead_row_whose_version_was_committed_as_committed(engine):
    died_after_commit = start_cycle(engine, stream="a", policy="full", parent=1, holder="cli:h:1")
    start_cycle(engine, stream="b", policy="full", parent=2, holder="cli:h:2",
                outcome=lambda i: ("committed", 2, {"ref": "HEAD"}) if i == died_after_commit else None)
    old, new = cycles(engine)
    assert (old.status, old.version) == ("committed", 2) and "after its commit" in old.detail["recovered"]
    assert new.status == "running"


def test_start_cycle_holds_the_write_lock_while_another_writer_commits(backend):
    # start_cycle reads the running rows, then writes. Another connection writing in between
    # (the scheduler's job table, an ingest) once failed it at once on SQLite with "database is
    # locked" (a deferred transaction cannot be upgraded over a newer write): the store's
    # engines begin writers with BEGIN IMMEDIATE, so the other writer waits instead.
    engine = make_engine(backend.engine_url("records.db"))
    try:
        dead = start_cycle(engine, stream="a", policy="full", parent=1, holder="cli:h:1")
        wrote: list[int] = []

        def other_writer() -> None:
            wrote.append(start_cycle(engine, stream="c", policy="full", parent=1, holder="cli:h:3"))

        def outcome(_row_id: int):
            thread = threading.Thread(target=other_writer)
            thread.start()
            thread.join(timeout=0.5)  # it must wait for our lock, not slip its write in between
            return None

        mine = start_cycle(engine, stream="b", policy="full", parent=1, holder="cli:h:2", outcome=outcome)
        deadline = time.monotonic() + 30
        while not wrote and time.monotonic() < deadline:
            time.sleep(0.05)
        rows = {row.id: row for row in cycles(engine)}
        assert rows[dead].status == "abandoned"
        assert wrote and rows[wrote[0]].status == "running"  # the other writer succeeded too
        if backend.name == "sqlite":  # one writer at a time: it went second, and saw our row
            assert wrote[0] > mine and rows[mine].status == "abandoned"
    finally:
        engine.dispose()


def test_finished_rows_are_not_abandoned_later(engine):
    done = start_cycle(engine, stream="a", policy="full", parent=1, holder="x")
    finish_cycle(engine, done, "committed", version=2, detail={"steps": 5})
    start_cycle(engine, stream="b", policy="full", parent=2, holder="x")
    row = cycles(engine)[0]
    assert (row.status, row.version, row.detail) == ("committed", 2, {"steps": 5})


@pytest.mark.parametrize("status,version,detail", [("committed", 7, {"steps": 3}), ("candidate", 8, None),
                                                   ("failed", None, {"error": "boom"}), ("interrupted", None, None)])
def test_finish_cycle_records_the_outcome(engine, status, version, detail):
    other = start_cycle(engine, stream="z", policy="full", parent=0, holder="x")
    finish_cycle(engine, other, "committed", version=1)
    cid = start_cycle(engine, stream="a", policy="full", parent=1, holder="x")
    before = utcnow()
    finish_cycle(engine, cid, status, version=version, detail=detail)
    first, row = cycles(engine)
    assert (row.status, row.version, row.detail) == (status, version, detail)
    assert row.finished_at >= before - timedelta(seconds=1) and row.started_at <= row.finished_at
    assert (first.status, first.version) == ("committed", 1)  # only the given row changed


# ---------------------------------------------------------------------------- audits
def test_record_audit_and_is_audited(engine):
    assert not is_audited(engine, 3)  # tables created on first use
    record_audit(engine, 3, queries=100, recall=1.0, report={"layers": {"blocks.1.ffn": {"recall": 1.0}}})
    assert is_audited(engine, 3) and not is_audited(engine, 4)
    record_audit(engine, 3, queries=50, recall=0.5, report={})
    with engine.connect() as conn:
        rows = list(conn.execute(select(AuditRow.__table__).order_by(AuditRow.id)))
    assert [(r.version, r.queries, r.recall) for r in rows] == [(3, 100, 1.0), (3, 50, 0.5)]
    assert rows[0].report == {"layers": {"blocks.1.ffn": {"recall": 1.0}}}


# ----------------------------------------------------------------------------- lease
def test_lease_acquire_renew_release(engine):
    lease = Lease(engine, holder="me", ttl_s=60)
    lease.acquire()
    row = lease_row(engine)
    assert row.holder == "me" and row.expires_at > utcnow() + timedelta(seconds=50)
    with engine.begin() as conn:  # let it run close to expiry
        conn.execute(update(LeaseRow).values(expires_at=utcnow() + timedelta(seconds=1)))
    lease.renew()
    assert lease_row(engine).expires_at > utcnow() + timedelta(seconds=50)
    lease.release()
    assert lease_row(engine) is None
    lease.acquire()  # free again
    lease.release()


def test_a_second_holder_is_refused_with_the_holders_name(engine):
    with Lease(engine, holder="cycle-one"):
        with pytest.raises(LeaseHeldError, match="cycle-one since") as info:
            Lease(engine, holder="cycle-two").acquire()
        assert info.value.hint and "--wait" in info.value.hint
        Lease(engine, holder="cycle-two").release()  # not the holder: releases nothing
        assert lease_row(engine).holder == "cycle-one"
        with Lease(engine, name="other", holder="cycle-two"):  # another name is another lease
            assert lease_row(engine, "other").holder == "cycle-two"
    assert lease_row(engine) is None  # released on leaving the block


def test_the_lease_is_released_when_the_block_raises(engine):
    with pytest.raises(RuntimeError):
        with Lease(engine, holder="me"):
            raise RuntimeError("cycle failed")
    assert lease_row(engine) is None


def test_an_expired_lease_is_taken_over_and_the_loser_cannot_renew(engine):
    dead = Lease(engine, holder="dead", ttl_s=60)
    dead.acquire()
    with engine.begin() as conn:
        conn.execute(update(LeaseRow).values(expires_at=utcnow() - timedelta(seconds=1)))
    alive = Lease(engine, holder="alive")
    alive.acquire()
    assert lease_row(engine).holder == "alive"
    with pytest.raises(LeaseHeldError, match="'cycle' lease of dead was lost"):
        dead.renew()
    dead.release()  # releasing a lost lease leaves the new holder's alone
    assert lease_row(engine).holder == "alive"
    alive.renew()


def test_renew_without_acquire_raises(engine):
    with pytest.raises(LeaseHeldError, match="lost"):
        Lease(engine, holder="me").renew()


def test_waiting_for_the_lease(engine):
    first = Lease(engine, holder="first")
    first.acquire()
    t0 = time.monotonic()
    with pytest.raises(LeaseHeldError, match="first"):
        Lease(engine, holder="impatient", wait_s=0.2, poll_s=0.05).acquire()
    assert time.monotonic() - t0 >= 0.2
    timer = threading.Timer(0.2, first.release)
    timer.start()
    try:
        Lease(engine, holder="patient", wait_s=10, poll_s=0.02).acquire()
    finally:
        timer.join()
    assert lease_row(engine).holder == "patient"


def test_keep_alive_renews_in_the_background(engine):
    lease = Lease(engine, holder="me", ttl_s=1.0)
    with lease:
        first = lease_row(engine).expires_at
        with lease.keep_alive(every_s=0.05):
            time.sleep(1.3)  # longer than the ttl: without renewals it would have expired
            assert lease_row(engine).expires_at > first
            with pytest.raises(LeaseHeldError):
                Lease(engine, holder="other").acquire()
        assert lease.lost is None


def test_keep_alive_reports_a_lost_lease_once(engine):
    lease = Lease(engine, holder="me", ttl_s=60)
    lease.acquire()
    with engine.begin() as conn:  # expired and taken over by another process
        conn.execute(update(LeaseRow).values(expires_at=utcnow() - timedelta(seconds=1)))
    Lease(engine, holder="thief").acquire()
    calls = []
    with lease.keep_alive(every_s=0.02, on_lost=calls.append):
        time.sleep(0.3)
    assert len(calls) == 1 and calls[0] is lease.lost and "lost" in str(lease.lost)
    assert lease_row(engine).holder == "thief"


def test_default_holder_names_the_host_and_process(engine):
    assert holder_name("scheduler") == f"scheduler:{socket.gethostname()}:{os.getpid()}"
    assert Lease(engine).holder == holder_name()


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)  # SQLite is one host's file: that host's clock
def test_lease_times_are_the_database_servers(engine, backend, monkeypatch):
    """Hosts sharing a PostgreSQL server agree on expiry whatever their clocks say: a host
    whose clock runs an hour fast neither takes a live lease nor renews one an hour long."""
    import lifelong.records as records

    steady = Lease(engine, holder="steady", ttl_s=60)
    steady.acquire()
    real = records.utcnow
    monkeypatch.setattr(records, "utcnow", lambda: real() + timedelta(hours=1))  # this host's clock
    with pytest.raises(LeaseHeldError, match="steady"):
        Lease(engine, holder="fast-clock").acquire()
    steady.renew()
    monkeypatch.setattr(records, "utcnow", real)
    row = lease_row(engine)
    assert row.holder == "steady" and row.expires_at < utcnow() + timedelta(seconds=90)
