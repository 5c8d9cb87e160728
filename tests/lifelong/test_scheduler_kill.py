"""SIGKILL of a running ``lifelong schedule run`` (3 trials of scripts/kill_scheduler.py), and the
dead-holder rules it relies on: a lease or cycle row of a dead process of this host is taken
over or closed at once, a live or foreign holder's never."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import create_engine, select

from lifelong.records import (CycleRow, Lease, LeaseHeldError, LeaseRow, holder_dead, holder_name, recover_cycles,
                              release_dead_leases, start_cycle, utcnow)

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "kill_scheduler.py"
HOST = socket.gethostname()


@pytest.fixture(scope="module")
def kill_scheduler():
    """scripts/kill_scheduler.py, imported as a module."""
    spec = importlib.util.spec_from_file_location("kill_scheduler", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def engine(tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path / 'records.db'}")
    yield engine
    engine.dispose()


@pytest.fixture
def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()  # reaped: no such process any more
    return proc.pid


@pytest.fixture
def live_proc():
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait()


def test_three_sigkills_of_the_scheduler_lose_nothing(kill_scheduler, tmp_path, tiny_init_flags):
    # Killed as training starts (row running, both leases held), between its commit and its
    # row's update (a version with a running row), and as it ingests (leases, no row); then a
    # clean scheduler runs one more cycle. Every invariant is checked after each kill.
    lines: list[str] = []
    phases = ["train", "committed", "ingest"]
    s = kill_scheduler.run(3, docs=400, files=3, budget=1200, workdir=tmp_path, phases=phases, pause=set(phases), measure=False,
                           init_flags=tiny_init_flags, say=lines.append)
    report = "\n".join(lines + s.failures)
    assert s.ok, report + "\n" + (tmp_path / "scheduler.log").read_text()[-4000:]
    assert s.trials == 3 and s.kills_by_phase == {"train": 1, "committed": 1, "ingest": 1}, report
    assert s.versions_committed == 2 and s.rows_recovered_committed == 1 and s.rows_abandoned == 1, report
    assert s.leases_left_by_kills == 3 and s.max_lease_wait_s < kill_scheduler.LEASE_WAIT_MAX_S, report
    log = (tmp_path / "scheduler.log").read_text()
    assert log.count("released: its holder is dead (no process") >= 3 and "skipped" not in log


def test_holder_dead_knows_this_hosts_processes(dead_pid, live_proc):
    now = utcnow()
    assert holder_dead(f"scheduler:{HOST}:{dead_pid}", now) == f"no process {dead_pid} on this host"
    assert holder_dead(f"scheduler:{HOST}:{live_proc.pid}", now) is None  # alive, started before `now`
    # The pid now names a process started after the holder was last known alive: another process.
    why = holder_dead(f"scheduler:{HOST}:{live_proc.pid}", now - timedelta(minutes=5))
    assert why is not None and why.startswith(f"pid {live_proc.pid} now belongs to a process started at")
    assert holder_dead(f"cli:{HOST}:{os.getpid()}", now - timedelta(minutes=5)) is None  # this process
    assert holder_dead(f"cli:another-host:{dead_pid}", now) is None  # another host: only its expiry tells
    assert holder_dead("me", now) is None and holder_dead(f"{HOST}:{dead_pid}", now) is None  # not a holder name


def test_a_zombie_holder_is_dead():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        end = time.monotonic() + 30
        while Path(f"/proc/{proc.pid}/stat").read_text().split(") ")[1][0] != "Z":  # exited, not yet reaped
            assert time.monotonic() < end
            time.sleep(0.05)
        assert holder_dead(f"cli:{HOST}:{proc.pid}", utcnow()) == f"no process {proc.pid} on this host"
    finally:
        proc.wait()


def test_a_dead_holders_lease_is_taken_over_at_once(engine, dead_pid, live_proc):
    Lease(engine, "scheduler", holder=f"scheduler:{HOST}:{dead_pid}", ttl_s=60).acquire()
    Lease(engine, "cycle", holder=f"scheduler:{HOST}:{dead_pid}", ttl_s=300).acquire()
    t0 = time.monotonic()
    for name in ("scheduler", "cycle"):
        mine = Lease(engine, name, holder=holder_name("test"), wait_s=0)
        mine.acquire()  # no wait for the 60 s / 300 s expiry
        mine.release()
    assert time.monotonic() - t0 < 5
    # A live holder on this host, or a holder on another host, keeps its lease.
    for holder in (f"scheduler:{HOST}:{live_proc.pid}", f"scheduler:elsewhere:{dead_pid}"):
        held = Lease(engine, "cycle", holder=holder, ttl_s=300)
        held.acquire()
        with pytest.raises(LeaseHeldError, match=holder):
            Lease(engine, "cycle", holder=holder_name("test")).acquire()
        assert release_dead_leases(engine) == []
        held.release()
    Lease(engine, "audit", holder=f"cli:{HOST}:{dead_pid}").acquire()
    assert release_dead_leases(engine) == [f"lease 'audit' of cli:{HOST}:{dead_pid} released: its holder is dead "
                                           f"(no process {dead_pid} on this host)"]
    with engine.connect() as conn:
        assert conn.execute(select(LeaseRow)).all() == []


def test_rows_left_running_by_a_dead_process_are_closed(engine, dead_pid, live_proc):
    dead = f"scheduler:{HOST}:{dead_pid}"
    lost = start_cycle(engine, stream="a", policy="full", parent=1, holder=dead)
    with engine.begin() as conn:  # three rows 'running' at once, as start_cycle alone would never leave them
        for holder in (dead, f"cli:{HOST}:{live_proc.pid}", f"cli:elsewhere:{dead_pid}"):
            conn.execute(CycleRow.__table__.insert().values(stream="a", policy="full", status="running", started_at=utcnow(),
                                                           parent_version=1, holder=holder))
    committed = lost + 1  # its version made it: 7
    closed = recover_cycles(engine, lambda cid: ("committed", 7, {"ref": "HEAD"}) if cid == committed else None)
    assert closed == [(lost, "abandoned"), (committed, "committed")]
    with engine.connect() as conn:
        rows = {r.id: r for r in conn.execute(select(CycleRow.__table__))}
    assert rows[lost].version is None and "its process died before recording an outcome (no process" in rows[lost].detail["error"]
    assert rows[committed].version == 7 and rows[committed].detail["ref"] == "HEAD" and "recovered" in rows[committed].detail
    assert [rows[i].status for i in (committed + 1, committed + 2)] == ["running", "running"]  # alive, or elsewhere
    assert recover_cycles(engine, lambda cid: None) == []


def test_held_out_documents_are_recorded_beside_a_concurrent_commit(tmp_path):
    # Found by the kill harness: a cycle's ingest failed with "database is locked" when the
    # scheduler's heartbeat committed between add_heldout's read and its insert (SQLite, WAL:
    # a transaction that read before another commit cannot write, whatever the busy timeout).
    from sqlalchemy import event, text

    from expert_store.schema import make_engine
    from streams import StreamRegistry
    from streams.staging import add_heldout, get_heldout

    engine = make_engine(f"sqlite:///{tmp_path / 'store.db'}")
    StreamRegistry(engine)  # its tables
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE beat (n INTEGER)"))
    other = make_engine(f"sqlite:///{tmp_path / 'store.db'}")

    @event.listens_for(engine, "after_cursor_execute")
    def commit_elsewhere(conn, cursor, statement, *_):
        if statement.lstrip().upper().startswith("SELECT") and "stream_heldout" in statement:
            with other.begin() as c:  # another connection commits right after the read
                c.execute(text("INSERT INTO beat VALUES (1)"))

    add_heldout(engine, "docs", ["doc 1", "doc 2"])
    add_heldout(engine, "docs", ["doc 2", "doc 3"])
    assert get_heldout(engine, "docs") == ["doc 1", "doc 2", "doc 3"]
    engine.dispose()
    other.dispose()
