"""The scheduler's job table is JSON: jobs round-trip, a hostile row is refused unread by pickle.

On SQLite and PostgreSQL (``backend``): a shared PostgreSQL is where a row could be written by
someone else."""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import pytest
from sqlalchemy import Column, Float, LargeBinary, MetaData, Table, Unicode, insert, select, update

from expert_store import ExpertStore
from lifelong import jobstore, jobtable, scheduler
from lifelong.cli.main import main
from streams import StreamRegistry


class _Hostile:
    """Unpickling this opens (creates) ``path`` for writing: a stand-in for any code."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture()
def store(tmp_path, tiny_init_flags, backend):
    path = tmp_path / "store"
    assert main(["--store", str(path), *backend.cli_flags(), "init", *tiny_init_flags]) == 0
    data = tmp_path / "news.txt"
    data.write_text("\n".join(f"news item {i}: the river rose overnight" for i in range(20)))
    st = ExpertStore.open(path, url=backend.url)
    (path / "streams").mkdir(exist_ok=True)
    StreamRegistry(st.engine, work_dir=str(path / "streams")).add("news", str(data))
    yield st
    st.close()


@pytest.fixture()
def no_pickle(monkeypatch):
    """Fail the test if anything unpickles."""

    def boom(*_a, **_k):
        raise AssertionError("a pickle was read")

    for name in ("loads", "load", "Unpickler"):
        monkeypatch.setattr(pickle, name, boom)


def flags(store: ExpertStore) -> list[str]:
    return ["--store", str(store.path), *(["--url", store.url] if store.url else [])]


def rows(store: ExpertStore) -> dict[str, tuple]:
    with store.engine.connect() as conn:
        return {r.id: (r.next_run_time, r.job) for r in conn.execute(select(jobtable.jobs_table))}


def test_jobs_are_json_rows_and_round_trip(store, no_pickle):
    a = jobstore.add_poll(store, "news", every_s=0.5, min_tokens=10, settings={"batch_size": 4}, tensorboard=False)
    b = jobstore.add_cycle(store, "news", cron="0 3 * * 1-5", misfire_grace_s=None)
    c = jobstore.add_audit(store, every_s=600)
    saved = rows(store)
    assert set(saved) == {"poll:news", "cycle:news", "audit"}
    for next_run, text in saved.values():
        assert isinstance(text, str) and isinstance(next_run, float)
        doc = json.loads(text)
        assert doc["format"] == 1 and doc["kind"] in jobtable.FUNCS and doc["executor"] == "default"
    assert json.loads(saved["cycle:news"][1])["trigger"]["fields"]["day_of_week"] == "mon,tue,wed,thu,fri"
    assert json.loads(saved["poll:news"][1])["trigger"]["seconds"] == 0.5
    listed = {j.id: j for j in jobstore.list_jobs(store)}
    for before in (a, b, c):
        after = listed[before.id]
        assert (after.trigger, after.description, after.kwargs) == (before.trigger, before.description, before.kwargs)
        assert after.next_run == before.next_run and after.next_run.tzinfo is not None
    with jobstore.edit_jobs(store) as sched:
        job = sched.get_job("cycle:news")
        assert job.func is scheduler.cycle_job and job.misfire_grace_time is None and job.coalesce and job.max_instances == 1
        assert job.trigger.get_next_fire_time(None, job.next_run_time) == job.next_run_time
        sched.pause_job("audit")
    assert rows(store)["audit"][0] is None and [j.id for j in jobstore.list_jobs(store)][-1] == "audit"  # paused: last


def test_only_the_three_job_functions_are_saved(store):
    with jobstore.edit_jobs(store) as sched, pytest.raises(ValueError, match="only lifelong.scheduler:poll_job"):
        sched.add_job("os:system", "interval", seconds=5, id="poll:x", kwargs={"command": "true"})
    assert rows(store) == {}


def test_the_hostile_payload_is_live(tmp_path):
    """What the tests below refuse would, once unpickled, have created the file."""
    pickle.loads(pickle.dumps(_Hostile(tmp_path / "pwned"))).close()
    assert (tmp_path / "pwned").exists()


BAD_ROWS = {
    "pickle bytes": lambda p: pickle.dumps(_Hostile(p)),
    "pickle text": lambda p: pickle.dumps(_Hostile(p), protocol=0).decode("latin-1"),
    "not an object": lambda p: json.dumps(["open", str(p)]),
}


@pytest.mark.parametrize("payload", sorted(BAD_ROWS))
def test_a_hostile_row_is_refused_and_never_unpickled(store, tmp_path, capsys, no_pickle, payload):
    jobstore.add_poll(store, "news", every_s=60, min_tokens=10)
    jobstore.add_audit(store, every_s=600)
    pwned = tmp_path / "pwned"
    with store.engine.begin() as conn:
        conn.execute(update(jobtable.jobs_table).where(jobtable.jobs_table.c.id == "poll:news").values(job=BAD_ROWS[payload](pwned)))

    with pytest.raises(jobtable.JobRowError, match="scheduled job 'poll:news' .* not loaded"):
        jobstore.list_jobs(store)
    code = main([*flags(store), "schedule", "list"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "'poll:news'" in err[0] and "schedule remove poll:news" in err[0]
    with pytest.raises(jobtable.JobRowError):
        scheduler.run_scheduler(store, once=True, install_signals=False)
    assert not pwned.exists()

    # Re-adding the id replaces the row unread; so does removing it.
    assert jobstore.add_poll(store, "news", every_s=30, min_tokens=5).replaced
    assert [j.id for j in jobstore.list_jobs(store)] == ["poll:news", "audit"]
    with store.engine.begin() as conn:
        conn.execute(update(jobtable.jobs_table).where(jobtable.jobs_table.c.id == "audit").values(job=BAD_ROWS[payload](pwned)))
    jobstore.remove_job(store, "audit")
    assert [j.id for j in jobstore.list_jobs(store)] == ["poll:news"] and not pwned.exists()


def _doc(**changes) -> str:
    doc = {"format": 1, "kind": "poll", "name": "x", "kwargs": {"store": "/s", "stream": "news", "min_tokens": 5},
           "trigger": {"type": "interval", "seconds": 60.0, "timezone": "UTC", "start": 0.0, "end": None, "jitter": None},
           "executor": "default", "misfire_grace_time": 300, "coalesce": True, "max_instances": 1}
    return json.dumps({**doc, **changes})


@pytest.mark.parametrize("text, why", [
    (_doc(kind="os:system"), "unknown kind 'os:system'"),
    (_doc(kind="audit"), "a audit job cannot have id 'poll:news'"),
    (_doc(kwargs={"store": "/s", "stream": "news", "min_tokens": 5, "command": "rm -rf /"}), "kwargs do not fit"),
    (_doc(trigger={"type": "date", "run_date": 0}), "trigger is not"),
    (_doc(trigger={"type": "interval", "seconds": -1, "timezone": "UTC", "start": 0.0, "end": None, "jitter": None}), "interval is -1"),
    (_doc(trigger={"type": "interval", "seconds": 1, "timezone": "Mars/Olympus", "start": 0.0, "end": None, "jitter": None}),
     "unknown time zone"),
    (_doc(executor="processpool"), "executor"),
    (_doc(func="os:system"), "not a job object"),
    ("{" * 100_000, "not JSON"),
])
def test_rows_of_the_wrong_shape_are_refused(text, why):
    with pytest.raises(jobtable.JobRowError, match="scheduled job 'poll:news'") as exc:
        jobtable.job_from_json("poll:news", text, 0.0)
    assert why in str(exc.value)
    assert jobtable.job_from_json("poll:news", _doc(), None)["func"] == "lifelong.scheduler:poll_job"


def test_pickled_jobs_of_the_previous_release_are_not_loaded(store, tmp_path, caplog, capsys, no_pickle):
    """The previous release kept jobs in SQLAlchemyJobStore's table lifelong_jobs (pickled)."""
    old = Table("lifelong_jobs", MetaData(), Column("id", Unicode(191), primary_key=True), Column("next_run_time", Float(25)),
                Column("job_state", LargeBinary, nullable=False))
    old.create(store.engine)
    pwned = tmp_path / "pwned"
    with store.engine.begin() as conn:
        for job_id in ("poll:news", "audit"):
            conn.execute(insert(old).values(id=job_id, next_run_time=0.0, job_state=pickle.dumps(_Hostile(pwned))))
    jobtable._warned.clear()
    caplog.set_level(logging.WARNING, logger="lifelong")
    assert jobstore.list_jobs(store) == [] and jobstore.list_jobs(store) == []
    warned = [r.getMessage() for r in caplog.records if "earlier release" in r.getMessage()]
    assert len(warned) == 1 and "2 scheduled job(s)" in warned[0] and "audit, poll:news" in warned[0]
    assert "lifelong schedule add" in warned[0] and "lifelong_jobs" in warned[0]
    assert jobtable.legacy_job_ids(store.engine) == {"lifelong_jobs": ["audit", "poll:news"]}

    jobstore.add_poll(store, "news", every_s=60, min_tokens=5)  # re-added: no longer counted
    jobstore.remove_job(store, "audit")  # drops the old row, unread
    assert jobtable.legacy_job_ids(store.engine) == {}
    assert [j.id for j in jobstore.list_jobs(store)] == ["poll:news"] and not pwned.exists()
    with pytest.raises(jobstore.JobNotFoundError):
        jobstore.remove_job(store, "audit")
