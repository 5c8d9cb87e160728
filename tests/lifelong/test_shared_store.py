"""One store database shared by processes in their own working directories, as on several
hosts: one scheduler runs and a second refuses; a cycle lease taken in one process is held
for every other, and a killed holder's lease expires. SQLite and PostgreSQL (``backend``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, select

from expert_store import ExpertStore
from lifelong.cli.main import main
from lifelong.records import Lease, LeaseHeldError, LeaseRow, create_tables

from backends import Backend

WORKER = Path(__file__).resolve().parents[1] / "backend_worker.py"


@pytest.fixture
def shared(tmp_path: Path, backend: Backend, tiny_init_flags: list[str]) -> tuple[Path, list[str], str]:
    """A tiny store on ``backend``: its path, the flags that reach it, its database URL."""
    path = tmp_path / "shared" / "store"
    assert main(["--store", str(path), *backend.cli_flags(), "init", *tiny_init_flags]) == 0
    with ExpertStore.open(path, url=backend.url) as store:
        create_tables(store.engine)
    return path, ["--store", str(path), *backend.cli_flags()], backend.url or f"sqlite:///{path / 'store.db'}"


def lifelong(flags: list[str], *args: str, cwd: Path, **kw) -> subprocess.Popen:
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([sys.executable, "-m", "lifelong.cli.main", *flags, *args], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"}, **kw)


def holder_of(url: str, name: str) -> str | None:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            row = conn.execute(select(LeaseRow.holder).where(LeaseRow.name == name)).first()
        return row.holder if row else None
    finally:
        engine.dispose()


def wait_until(pred, proc: subprocess.Popen, what: str, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        if proc.poll() is not None:
            raise AssertionError(f"{what}: the process exited {proc.returncode}: {proc.stderr.read()}")
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_two_schedulers_on_one_database_one_runs_one_refuses(shared, tmp_path: Path) -> None:
    _, flags, url = shared
    procs = [lifelong(flags, "schedule", "run", cwd=tmp_path / f"host-{i}") for i in range(2)]  # started together
    try:
        end = time.monotonic() + 120
        while all(p.poll() is None for p in procs):  # the loser exits once it finds the lease held
            assert time.monotonic() < end, "neither scheduler refused"
            time.sleep(0.1)
        loser = next(p for p in procs if p.poll() is not None)
        runner = next(p for p in procs if p is not loser)
        out, err = loser.communicate()
        assert loser.returncode == 1, (out, err)
        lines = err.splitlines()
        assert lines[0].startswith("error: a scheduler is running on this store (scheduler:"), err
        assert f":{runner.pid} since" in lines[0] and holder_of(url, "scheduler").endswith(f":{runner.pid}")
        assert "Traceback" not in err and all(line.startswith(("error:", "hint:")) for line in lines)
        time.sleep(0.5)
        assert runner.poll() is None  # the other one keeps running
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        codes = []
        for p in procs:
            try:
                codes.append(p.wait(60))
            finally:
                if p.poll() is None:
                    p.kill()
                    p.wait()
    assert codes[procs.index(runner)] == 0, runner.stderr.read()  # SIGTERM: a clean stop
    assert holder_of(url, "scheduler") is None  # ... that released the lease


def test_cycle_lease_across_processes(shared, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path, flags, url = shared
    data = tmp_path / "news.txt"
    data.write_text("\n".join(f"news item {i}: the river rose overnight" for i in range(20)))
    assert main([*flags, "stream", "add", "news", str(data)]) == 0
    sync = tmp_path / "sync"
    sync.mkdir()
    holder = subprocess.Popen([sys.executable, str(WORKER), "hold-lease", url, "cycle", "3", str(sync)],
                              cwd=tmp_path / "shared", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: (sync / "held").exists(), holder, "the other process's cycle lease")
        name = (sync / "held").read_text()
        assert name.endswith(f":{holder.pid}")
        engine = create_engine(url)
        with pytest.raises(LeaseHeldError, match=f"another cycle is running on this store \\({name} since"):
            Lease(engine, "cycle", holder="here").acquire()
        capsys.readouterr()
        assert main([*flags, "cycle", "--stream", "news"]) == 1  # refused before any training
        err = capsys.readouterr().err
        assert err.startswith(f"error: another cycle is running on this store ({name} since") and "nothing was done" in err
        with ExpertStore.open(path, url=None if url.startswith("sqlite") else url) as store:
            assert len(store.versions()) == 1

        # The holder dies without releasing: its lease expires (ttl 3 s) and is taken over.
        holder.kill()
        holder.wait()
        t0 = time.monotonic()
        Lease(engine, "cycle", holder="here", wait_s=30, poll_s=0.1).acquire()
        assert 0 < time.monotonic() - t0 < 30 and holder_of(url, "cycle") == "here"
        engine.dispose()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
