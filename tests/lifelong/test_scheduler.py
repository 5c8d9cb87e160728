"""The scheduler: persistent jobs, run --once, held lease, restart and SIGTERM (real CLI, tiny model)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from expert_store import ExpertStore
from lifelong import jobstore, scheduler
from lifelong.cli.main import main
from lifelong.records import CycleRow, Lease, LeaseRow, create_tables
from streams import StreamRegistry

FAST = ["--batch-size", "4", "--eval-tokens", "512", "--grow-rows", "2", "--no-tensorboard", "--budget", "100000"]


@pytest.fixture()
def store_dir(tmp_path, tiny_init_flags):
    path = tmp_path / "store"
    assert main(["--store", str(path), "init", *tiny_init_flags]) == 0
    data = tmp_path / "news.txt"
    data.write_text("\n".join(f"news item {i}: the river rose {i % 7} feet overnight and the bridge stayed shut" for i in range(40)))
    with ExpertStore.open(path) as store:
        (path / "streams").mkdir(exist_ok=True)
        StreamRegistry(store.engine, work_dir=str(path / "streams")).add("news", str(data))
    return path


def cli(store_dir, *args, capsys):
    code = main(["--store", str(store_dir), *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def versions(store_dir) -> list[int]:
    with ExpertStore.open(store_dir) as store:
        return [v.id for v in store.versions()]


def cycle_rows(store_dir) -> list:
    with ExpertStore.open(store_dir) as store:
        create_tables(store.engine)
        with store.engine.connect() as conn:
            return conn.execute(select(CycleRow.__table__).order_by(CycleRow.id)).all()


def pending_tokens(store_dir, stream="news") -> int:
    with ExpertStore.open(store_dir) as store:
        cursor = store.version("HEAD").cursors.get(stream)
        return StreamRegistry(store.engine, work_dir=str(Path(store_dir) / "streams")).pending(stream, cursor).tokens


def jobs(store_dir) -> dict[str, tuple]:
    with ExpertStore.open(store_dir) as store:
        return {j.id: (j.trigger, j.description, json.dumps(j.kwargs, sort_keys=True)) for j in jobstore.list_jobs(store)}


def wait_for(pred, timeout=60.0, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def start_scheduler(store_dir, log_path: Path) -> subprocess.Popen:
    with open(log_path, "ab") as log:
        return subprocess.Popen([sys.executable, "-m", "lifelong.cli.main", "--store", str(store_dir), "schedule", "run"],
                                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_jobs_persist_replace_and_remove(store_dir, capsys):
    assert cli(store_dir, "schedule", "add", "poll", "news", "--every", "60", "--min-tokens", "1000", *FAST, capsys=capsys)[0] == 0
    code, out, _ = cli(store_dir, "schedule", "add", "cycle", "news", "--cron", "0 3 * * 1-5", "--policy", "freeze-all", capsys=capsys)
    assert code == 0 and "added job cycle:news" in out and "cron 0 3 * * mon,tue,wed,thu,fri" in out
    assert cli(store_dir, "schedule", "add", "audit", "--every", "600", capsys=capsys)[0] == 0
    code, out, _ = cli(store_dir, "schedule", "list", "--json", capsys=capsys)
    listed = {j["id"]: j for j in json.loads(out)}
    assert set(listed) == {"poll:news", "cycle:news", "audit"}
    assert listed["poll:news"]["kwargs"]["settings"]["batch_size"] == 4 and listed["poll:news"]["trigger"] == "every 60 s"

    # Re-adding the same id replaces the job: no duplicate, new settings.
    code, out, _ = cli(store_dir, "schedule", "add", "poll", "news", "--every", "30", "--min-tokens", "5", capsys=capsys)
    assert code == 0 and out.startswith("replaced job poll:news")
    seen = jobs(store_dir)  # a fresh scheduler on the same table
    assert len(seen) == 3 and seen["poll:news"][0] == "every 30 s" and '"min_tokens": 5' in seen["poll:news"][2]

    assert cli(store_dir, "schedule", "remove", "cycle:news", capsys=capsys)[0] == 0
    assert set(jobs(store_dir)) == {"poll:news", "audit"}
    code, _, err = cli(store_dir, "schedule", "remove", "cycle:news", capsys=capsys)
    assert code == 1 and "no scheduled job 'cycle:news'" in err
    code, _, err = cli(store_dir, "schedule", "add", "poll", "nope", "--every", "5", "--min-tokens", "1", capsys=capsys)
    assert code == 1 and "nope" in err
    code, _, err = cli(store_dir, "schedule", "add", "cycle", "news", "--cron", "0 3 * *", capsys=capsys)
    assert code == 1 and "5 fields" in err
    code, out, _ = cli(store_dir, "schedule", "status", "--json", capsys=capsys)
    assert code == 0 and len(json.loads(out)["jobs"]) == 2 and json.loads(out)["leases"] == []


def test_crontab_weekdays_are_standard():
    assert jobstore._crontab_dow("0") == "sun" and jobstore._crontab_dow("7") == "sun"
    assert jobstore._crontab_dow("1-5") == "mon,tue,wed,thu,fri"
    assert jobstore._crontab_dow("*/2") == "sun,tue,thu,sat"
    assert jobstore._crontab_dow("*") == "*" and jobstore._crontab_dow("mon-fri") == "mon-fri"


def test_run_once_runs_the_due_poll_job(store_dir, capsys):
    cli(store_dir, "schedule", "add", "poll", "news", "--every", "3600", "--min-tokens", "100", *FAST, capsys=capsys)
    cli(store_dir, "schedule", "add", "cycle", "news", "--cron", "0 3 * * *", capsys=capsys)  # not due
    cli(store_dir, "schedule", "add", "audit", "--every", "1", capsys=capsys)
    time.sleep(1.1)  # the audit job is due; it runs after the cycles
    code, out, _ = cli(store_dir, "schedule", "run", "--once", "--json", capsys=capsys)
    results = {r["job"]: r for r in json.loads(out)}
    assert code == 0 and results["poll:news"]["status"] == "committed" and results["cycle:news"]["status"] == "not-due"
    assert results["audit"]["status"] == "passed" and results["audit"]["version"] == 2
    assert versions(store_dir) == [1, 2] and pending_tokens(store_dir) == 0
    code, out, _ = cli(store_dir, "schedule", "run", "--once", capsys=capsys)
    assert code == 0 and "poll:news: below-threshold" in out and versions(store_dir) == [1, 2]
    assert "audit: not-due" in out or "audit: already-audited" in out
    assert [r.status for r in cycle_rows(store_dir)] == ["committed"]
    with ExpertStore.open(store_dir) as store, Lease(store.engine, "scheduler", holder="scheduler:other:7"):
        code, _, err = cli(store_dir, "schedule", "run", "--once", capsys=capsys)
    assert code == 1 and "a scheduler is running on this store (scheduler:other:7" in err


def test_held_lease_skips_and_the_scheduler_keeps_running(store_dir, caplog):
    with ExpertStore.open(store_dir) as store:
        jobstore.add_poll(store, "news", every_s=0.5, min_tokens=100, tensorboard=False,
                           settings={"batch_size": 4, "eval_tokens": 512, "grow_rows": 2})
    held = Lease(ExpertStore.open(store_dir).engine, "cycle", holder="cli:elsewhere:1")
    held.acquire()
    caplog.set_level(logging.INFO, logger="lifelong")
    store = ExpertStore.open(store_dir)
    thread = threading.Thread(target=scheduler.run_scheduler, args=(store,), kwargs={"install_signals": False}, daemon=True)
    thread.start()
    try:
        skips = lambda: sum("skipped" in r.getMessage() and "cli:elsewhere:1" in r.getMessage() for r in caplog.records)  # noqa: E731
        wait_for(lambda: skips() >= 2, 30, "two skipped polls")
        assert thread.is_alive() and versions(store_dir) == [1]
        held.release()
        wait_for(lambda: versions(store_dir) == [1, 2], 60, "the cycle after the lease was released")
    finally:
        scheduler.request_stop()
        thread.join(60)
    assert not thread.is_alive()
    assert [r.status for r in cycle_rows(store_dir)] == ["committed"]
    store.close()


def test_restart_neither_duplicates_nor_loses_cycles(store_dir, tmp_path, capsys):
    cli(store_dir, "schedule", "add", "poll", "news", "--every", "1", "--min-tokens", "100", *FAST, capsys=capsys)
    cli(store_dir, "schedule", "add", "cycle", "news", "--cron", "0 3 * * *", capsys=capsys)
    cli(store_dir, "schedule", "add", "audit", "--every", "3600", capsys=capsys)
    before = jobs(store_dir)
    log = tmp_path / "scheduler.log"
    proc = start_scheduler(store_dir, log)
    try:
        wait_for(lambda: [r.status for r in cycle_rows(store_dir)] == ["committed"], 90, "the first cycle")
    finally:
        assert stop(proc) == 0, log.read_text()
    assert jobs(store_dir) == before and versions(store_dir) == [1, 2]

    proc = start_scheduler(store_dir, log)  # resumes from the persisted jobs
    try:
        wait_for(lambda: log.read_text().count("tokens pending < 100: no cycle") >= 2, 60, "two polls after the restart")
    finally:
        assert stop(proc) == 0, log.read_text()
    assert jobs(store_dir) == before
    assert versions(store_dir) == [1, 2] and pending_tokens(store_dir) == 0  # consumed exactly once
    assert [r.status for r in cycle_rows(store_dir)] == ["committed"]
    text = log.read_text()
    assert text.count("scheduler running on") == 2 and text.count("scheduler stopped") == 2


def test_sigterm_during_a_cycle_writes_no_half_version(store_dir, tmp_path, capsys):
    cli(store_dir, "schedule", "add", "poll", "news", "--every", "1", "--min-tokens", "100", *FAST, "--epochs", "600", capsys=capsys)
    log = tmp_path / "scheduler.log"
    proc = start_scheduler(store_dir, log)
    try:
        wait_for(lambda: any(r.status == "running" for r in cycle_rows(store_dir)), 90, "a running cycle")
        wait_for(lambda: "cycle 1: stream 'news'" in log.read_text(), 60, "training to start")
        time.sleep(3.0)  # inside training (1650 steps; the first ones compile)
    finally:
        code = stop(proc)
    text = log.read_text()
    assert code == 0, text
    assert "SIGTERM: stopping" in text
    rows = cycle_rows(store_dir)
    assert len(rows) == 1 and rows[0].status in ("interrupted", "committed")
    with ExpertStore.open(store_dir) as store:
        assert store.verify() == []
        ids = [v.id for v in store.versions()]
        with store.engine.connect() as conn:
            assert conn.execute(select(LeaseRow)).all() == []  # both leases released
    if rows[0].status == "interrupted":
        assert ids == [1] and rows[0].version is None and "no version was committed" in text
    else:
        assert ids == [1, 2] and rows[0].version == 2
