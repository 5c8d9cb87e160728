"""The user's commands while a cycle runs in another process (real CLI processes, tiny model).

A child runs ``lifelong cycle`` and stops at a chosen point (training has started; or its
objects are written and its rows are not) until the test lets it go; meanwhile this process
runs the competing command: ``rollback``, ``gc``, ``stream remove``; and a second
``schedule run`` beside a running one.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from cycle_testlib import cycle_rows, registry
from cycle_testlib import base  # noqa: F401 (fixture, requested by name)
from sqlalchemy import select

from expert_store import ExpertStore
from lifelong.checkpoint import checkout_model, commit_model
from lifelong.cli.main import main
from lifelong.records import LeaseRow, create_tables

CHILD = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path

    marker, go, phase = Path(os.environ["LL_MARKER"]), Path(os.environ["LL_GO"]), os.environ["LL_PHASE"]

    def pause():
        marker.write_text(str(os.getpid()))
        end = time.monotonic() + 120
        while not go.exists():
            if time.monotonic() > end:
                sys.exit("the test never let the cycle go on")
            time.sleep(0.05)

    if phase == "train":  # the lease is held, the cycle row is 'running', training starts
        import lifelong.cycle as cyc
        real_train = cyc.train

        def train(*a, **kw):
            pause()
            return real_train(*a, **kw)

        cyc.train = train
    else:  # "commit": the version's objects are written, its rows and the ref move are not
        from expert_store.store import ExpertStore
        real_write = ExpertStore._write

        def _write(self, *a, **kw):
            if not marker.exists():
                pause()
            return real_write(self, *a, **kw)

        ExpertStore._write = _write

    from lifelong.cli.main import main
    sys.exit(main(sys.argv[1:]))
    """
)
CYCLE = ["--batch-size", "8", "--grow-rows", "2", "--eval-tokens", "256", "--budget", "4000", "--no-progress", "--device", "cpu"]


@pytest.fixture()
def store_path(tmp_path, base) -> Path:  # noqa: F811
    path = tmp_path / "store"
    shutil.copytree(base, path)
    return path


class PausedCycle:
    """``lifelong cycle --stream STREAM`` in a child process that stops at ``phase``."""

    def __init__(self, store: Path, stream: str, phase: str) -> None:
        self.marker, self.go = store.with_name("paused"), store.with_name("go")
        self.err = store.with_name("cycle.stderr")
        env = {**os.environ, "LL_MARKER": str(self.marker), "LL_GO": str(self.go), "LL_PHASE": phase}
        with open(self.err, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-c", CHILD, "--store", str(store), "cycle", "--stream", stream, *CYCLE],
                                         env=env, stdout=subprocess.PIPE, stderr=err, text=True)
        end = time.monotonic() + 120
        while not self.marker.exists():
            assert self.proc.poll() is None, f"the cycle exited early ({self.proc.returncode}):\n{self.err.read_text()[-3000:]}"
            assert time.monotonic() < end, "the cycle never reached its pause"
            time.sleep(0.1)

    def finish(self) -> tuple[int, str, str]:
        self.go.touch()
        out, _ = self.proc.communicate(timeout=300)
        return self.proc.returncode, out, self.err.read_text()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


@pytest.fixture()
def paused(store_path):
    cycles: list[PausedCycle] = []

    def start(stream: str = "a", phase: str = "train") -> PausedCycle:
        cycles.append(PausedCycle(store_path, stream, phase))
        return cycles[-1]

    yield start
    for c in cycles:
        c.kill()


def cli(store_path: Path, capsys, *args: str) -> tuple[int, str, list[str]]:
    code = main(["--store", str(store_path), *args])
    out = capsys.readouterr()
    return code, out.out, out.err.strip().splitlines()


def leases(store: ExpertStore) -> list:
    create_tables(store.engine)
    with store.engine.connect() as conn:
        return conn.execute(select(LeaseRow)).all()


def test_rollback_during_a_cycle_keeps_its_version_as_a_candidate(store_path, paused, capsys):
    with ExpertStore.open(store_path) as store:  # a second version, so that there is somewhere to roll back to
        model, origin = checkout_model(store, 1)
        assert commit_model(store, model, origin=origin, message="test: a copy of version 1").version.id == 2
    child = paused("a", "train")
    code, out, _ = cli(store_path, capsys, "rollback", "1")
    assert code == 0 and "HEAD moved 2 -> 1" in out
    code, out, err = child.finish()

    errors = [line for line in err.strip().splitlines() if line.startswith(("error:", "hint:"))]
    assert code == 1 and "Traceback" not in err and len(errors) == 1, err
    assert errors[0].startswith("error: HEAD moved from version 2 to 1 while cycle 1 ran")
    assert "kept as 'candidate/1'" in errors[0] and f"lifelong --store {store_path} rollback candidate/1`" in errors[0]
    with ExpertStore.open(store_path) as store:
        assert store.head() == 1 and {r.name: r.version_id for r in store.refs()} == {"HEAD": 1, "candidate/1": 3}
        cand = store.version("candidate/1")
        assert cand.parent == 2 and "a" in cand.cursors and store.version("HEAD").cursors.get("a") is None
        reg = registry(store)
        assert reg.pending("a", None).tokens > 0  # HEAD's cursor did not move: the data stays pending
        rows = cycle_rows(store)
        assert [(r.status, r.version) for r in rows] == [("candidate", 3)]
        assert rows[0].detail == {"ref": "candidate/1", "reason": "HEAD moved from 2 to 1"}
        assert store.verify() == [] and leases(store) == []
    code, out, _ = cli(store_path, capsys, "rollback", "candidate/1")  # adopting it is one command
    assert code == 0 and "HEAD moved 1 -> 3" in out


def test_gc_during_a_commit_spares_its_objects(store_path, paused, capsys):
    with ExpertStore.open(store_path) as store:
        orphan = store.objects.put({"x": torch.arange(7.0)}).hash  # left by an old crash: gc takes it
        old = time.time() - 3600
        os.utime(store.objects.path(orphan), (old, old))
        before = set(store.objects.hashes())
    child = paused("a", "commit")
    with ExpertStore.open(store_path) as store:
        with store._read() as session:
            from expert_store.maintenance import referenced_objects

            in_flight = set(store.objects.hashes()) - before - set(referenced_objects(session))
    assert in_flight, "the paused commit had written no object"
    code, out, _ = cli(store_path, capsys, "gc")
    assert code == 0 and "deleted 1 unreachable objects" in out and orphan in out
    code, out, err = child.finish()
    assert code == 0 and "committed version 2" in out, err
    with ExpertStore.open(store_path) as store:
        assert not store.objects.path(orphan).exists()
        assert all(store.objects.path(h).exists() for h in in_flight)
        assert store.verify() == [] and store.head() == 2
        checkout_model(store, "HEAD")  # every object re-hashed


def test_stream_remove_during_a_cycle_is_refused(store_path, paused, capsys):
    child = paused("a", "train")
    for name in ("a", "b"):  # its own stream, and one it reads for evaluation
        code, _, err = cli(store_path, capsys, "stream", "remove", name)
        assert code == 1 and len(err) == 1, err
        assert err[0].startswith("error: cycle 1 is training stream 'a' (cli:") and err[0].endswith(
            f"stream '{name}' was not removed; remove it once the cycle has ended")
    code, out, err = child.finish()
    assert code == 0 and "committed version 2" in out, err
    with ExpertStore.open(store_path) as store:
        assert {s.name for s in registry(store).list()} >= {"a", "b"} and leases(store) == []
    code, out, _ = cli(store_path, capsys, "stream", "remove", "b")  # once the cycle has ended
    assert code == 0 and out.startswith("removed stream b")


def test_a_second_scheduler_is_refused(store_path, tmp_path, capsys):
    log = tmp_path / "scheduler.log"
    with open(log, "w") as f:
        first = subprocess.Popen([sys.executable, "-m", "lifelong.cli.main", "--store", str(store_path), "schedule", "run"],
                                 stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        end = time.monotonic() + 120
        while "scheduler running on" not in log.read_text():
            assert first.poll() is None and time.monotonic() < end, log.read_text()
            time.sleep(0.1)
        for args in (["schedule", "run", "--once"], ["schedule", "run"]):
            code, _, err = cli(store_path, capsys, *args)
            assert code == 1 and err[0].startswith("error: a scheduler is running on this store (scheduler:"), err
            assert f":{first.pid} since" in err[0] and "Traceback" not in "\n".join(err)
    finally:
        first.send_signal(signal.SIGTERM)
        code = first.wait(60)
    assert code == 0, log.read_text()
    with ExpertStore.open(store_path) as store:
        assert leases(store) == []
