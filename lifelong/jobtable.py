"""The scheduler's job table, kept as JSON: a job row is never unpickled.

APScheduler 3's ``SQLAlchemyJobStore`` pickles each job and unpickles it whenever the
scheduler loads jobs, so whoever can write one row of the store's database (a shared
PostgreSQL) would run code in the scheduler. :class:`JsonJobStore` keeps each job in the
table ``lifelong_schedule`` as one JSON document instead::

    id             "poll:news" (primary key)
    next_run_time  UTC timestamp, NULL = paused
    job            {"format": 1, "kind": "poll", "name": "...", "kwargs": {...},
                    "trigger": {"type": "interval", "seconds": 60.0, ...} | {"type": "cron", "fields": {...}, ...},
                    "executor": "default", "misfire_grace_time": 300, "coalesce": true, "max_instances": 1}

Loading a row checks its whole shape: the kind names one of the three job functions of
:mod:`lifelong.scheduler` (nothing else is ever imported or called), the kwargs fit that
function's signature, the trigger is an interval or a crontab with a named time zone. A
row that does not (a pickle payload, an unknown function) raises :class:`JobRowError`
naming the job. This module never imports :mod:`pickle`.

Stores made before hold their jobs pickled in ``lifelong_jobs``: those rows are never read
(only their ids are), and opening the job store says once per process how many there are
and that they must be re-added (:func:`legacy_job_ids`).
"""

from __future__ import annotations

import inspect
import json
import logging
import math
from datetime import datetime, timezone, tzinfo
from typing import Any

from apscheduler.job import Job
from apscheduler.jobstores.base import BaseJobStore, ConflictingIdError, JobLookupError
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
from apscheduler.util import datetime_to_utc_timestamp, utc_timestamp_to_datetime
from sqlalchemy import Column, Engine, Float, MetaData, Table, Text, Unicode, delete, inspect as sa_inspect, select
from sqlalchemy.exc import IntegrityError

from expert_store import write_begin

from .errors import LifelongError

__all__ = ["TABLE", "LEGACY_TABLES", "FUNCS", "JobRowError", "JsonJobStore", "job_to_json", "job_from_json", "legacy_job_ids",
           "forget_legacy_job"]

log = logging.getLogger("lifelong.jobstore")

TABLE = "lifelong_schedule"
LEGACY_TABLES = ("lifelong_jobs", "apscheduler_jobs")  # pickled rows of earlier releases (and APScheduler's default name)
FORMAT = 1
FUNCS = {"poll": "lifelong.scheduler:poll_job", "cycle": "lifelong.scheduler:cycle_job", "audit": "lifelong.scheduler:audit_job"}
_KIND_OF = {ref: kind for kind, ref in FUNCS.items()}
_KEYS = {"format", "kind", "name", "kwargs", "trigger", "executor", "misfire_grace_time", "coalesce", "max_instances"}

_metadata = MetaData()
jobs_table = Table(
    TABLE, _metadata,
    Column("id", Unicode(191), primary_key=True),
    Column("next_run_time", Float(25), index=True, nullable=True),
    Column("job", Text, nullable=False),
)


class JobRowError(LifelongError):
    """A row of the job table is not a job this version wrote (not JSON of the job shape)."""


# ------------------------------------------------------------------------------ JSON <-> Job
def _tz_name(tz: tzinfo) -> str:
    key = getattr(tz, "key", None) or getattr(tz, "zone", None)
    if key:
        return str(key)
    if tz == timezone.utc:
        return "UTC"
    raise ValueError(f"the time zone {tz!r} has no name; set TZ to a named zone (e.g. Europe/Paris)")


def _tz(name: Any) -> tzinfo:
    if not isinstance(name, str):
        raise ValueError(f"timezone is {name!r}, not a zone name")
    if name == "local":  # tzlocal's name for an unnamed local zone
        from tzlocal import get_localzone

        return get_localzone()
    from apscheduler.util import astimezone

    try:
        return astimezone(name)
    except Exception as exc:  # ZoneInfoNotFoundError, ValueError
        raise ValueError(f"unknown time zone {name!r}") from exc


def _ts(dt: datetime | None) -> float | None:
    return datetime_to_utc_timestamp(dt) if dt is not None else None


def _dt(value: Any, tz: tzinfo, what: str) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{what} is {value!r}, not a UTC timestamp")
    return utc_timestamp_to_datetime(float(value)).astimezone(tz)


def _trigger_to_json(trigger: Any) -> dict[str, Any]:
    common = {"timezone": _tz_name(trigger.timezone), "start": _ts(trigger.start_date), "end": _ts(trigger.end_date),
              "jitter": trigger.jitter}
    if isinstance(trigger, IntervalTrigger):
        return {"type": "interval", "seconds": trigger.interval.total_seconds(), **common}
    if isinstance(trigger, CronTrigger):
        return {"type": "cron", "fields": {f.name: str(f) for f in trigger.fields}, **common}
    raise ValueError(f"a {type(trigger).__name__} cannot be saved: jobs run on an interval or a crontab")


def _trigger_from_json(t: Any) -> IntervalTrigger | CronTrigger:
    if not isinstance(t, dict) or t.get("type") not in ("interval", "cron"):
        raise ValueError("trigger is not {'type': 'interval' | 'cron', ...}")
    expected = {"type", "timezone", "start", "end", "jitter", "seconds" if t["type"] == "interval" else "fields"}
    if set(t) != expected:
        raise ValueError(f"trigger keys are {sorted(t)}, expected {sorted(expected)}")
    tz = _tz(t["timezone"])
    jitter = t["jitter"]
    if jitter is not None and (isinstance(jitter, bool) or not isinstance(jitter, int) or jitter < 0):
        raise ValueError(f"trigger jitter is {jitter!r}, not null or a whole number of seconds")
    when = dict(start_date=_dt(t["start"], tz, "trigger start"), end_date=_dt(t["end"], tz, "trigger end"), timezone=tz, jitter=jitter)
    if t["type"] == "interval":
        s = t["seconds"]
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not (math.isfinite(s) and s > 0):
            raise ValueError(f"interval is {s!r}, not a positive number of seconds")
        return IntervalTrigger(seconds=float(s), **when)
    fields = t["fields"]
    if not isinstance(fields, dict) or set(fields) != set(CronTrigger.FIELD_NAMES) or not all(isinstance(v, str) for v in fields.values()):
        raise ValueError(f"cron fields must be the strings {', '.join(CronTrigger.FIELD_NAMES)}")
    return CronTrigger(**fields, **when)


def job_to_json(job: Job) -> str:
    """The JSON document of ``job`` (one of :data:`FUNCS`; plain JSON kwargs, no args)."""
    kind = _KIND_OF.get(job.func_ref)
    if kind is None:
        raise ValueError(f"job {job.id!r} calls {job.func_ref!r}: only {', '.join(FUNCS.values())} can be scheduled")
    if job.args:
        raise ValueError(f"job {job.id!r} has positional args: scheduled jobs take keyword arguments only")
    doc = {"format": FORMAT, "kind": kind, "name": job.name, "kwargs": dict(job.kwargs), "trigger": _trigger_to_json(job.trigger),
           "executor": job.executor, "misfire_grace_time": job.misfire_grace_time, "coalesce": bool(job.coalesce),
           "max_instances": int(job.max_instances)}
    return json.dumps(doc, sort_keys=True, allow_nan=False)


def _check_kwargs(kind: str, kwargs: Any) -> dict[str, Any]:
    from . import scheduler  # the job functions (imported here: the scheduler imports this module)

    if not isinstance(kwargs, dict):
        raise ValueError("kwargs is not an object")
    try:
        inspect.signature(getattr(scheduler, FUNCS[kind].split(":")[1])).bind(**kwargs)
    except TypeError as exc:
        raise ValueError(f"kwargs do not fit {FUNCS[kind]}: {exc}") from None
    if not isinstance(kwargs.get("store"), str):
        raise ValueError("kwargs.store is not a path")
    return kwargs


def job_from_json(job_id: str, text: Any, next_run_time: Any) -> dict[str, Any]:
    """The ``Job.__setstate__`` state of a row; :class:`JobRowError` when it is not a job."""
    try:
        if not isinstance(text, str):  # e.g. bytes: a pickle payload, as the previous release wrote
            raise ValueError(f"the row holds {type(text).__name__}, not JSON text")
        try:
            doc = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise ValueError(f"not JSON ({str(exc)[:80]})") from None
        if not isinstance(doc, dict) or set(doc) != _KEYS:
            raise ValueError(f"not a job object (keys {sorted(doc) if isinstance(doc, dict) else type(doc).__name__})")
        if doc["format"] != FORMAT:
            raise ValueError(f"format {doc['format']!r}, this version reads {FORMAT}")
        kind = doc["kind"]
        if kind not in FUNCS:
            raise ValueError(f"unknown kind {kind!r}: only {', '.join(FUNCS)} jobs exist")
        if job_id.split(":")[0] != kind:
            raise ValueError(f"a {kind} job cannot have id {job_id!r}")
        trigger = _trigger_from_json(doc["trigger"])
        grace, inst = doc["misfire_grace_time"], doc["max_instances"]
        if grace is not None and (isinstance(grace, bool) or not isinstance(grace, int) or grace < 1):
            raise ValueError(f"misfire_grace_time is {grace!r}")
        if isinstance(inst, bool) or not isinstance(inst, int) or inst < 1:
            raise ValueError(f"max_instances is {inst!r}")
        if doc["executor"] != "default" or not isinstance(doc["coalesce"], bool) or not isinstance(doc["name"], str):
            raise ValueError("executor, coalesce or name is not what this version writes")
        return {
            "version": 1, "id": job_id, "func": FUNCS[kind], "trigger": trigger, "executor": "default", "args": (),
            "kwargs": _check_kwargs(kind, doc["kwargs"]), "name": doc["name"], "misfire_grace_time": grace,
            "coalesce": doc["coalesce"], "max_instances": inst,
            "next_run_time": _dt(next_run_time, trigger.timezone, "next_run_time"),
        }
    except ValueError as exc:
        raise JobRowError(
            f"scheduled job {job_id!r} in table {TABLE} is not a job this version wrote ({exc}); it was not loaded: "
            f"remove it with `lifelong schedule remove {job_id}` and add it again"
        ) from None


# ------------------------------------------------------------------------------ the job store
class JsonJobStore(BaseJobStore):
    """An APScheduler 3 job store on the store's database, one JSON row per job."""

    def __init__(self, engine: Engine) -> None:
        super().__init__()
        self.engine = engine

    def start(self, scheduler: Any, alias: str) -> None:
        super().start(scheduler, alias)
        _metadata.create_all(self.engine, tables=[jobs_table])
        _warn_legacy(self.engine)

    def has_job(self, job_id: str) -> bool:
        """Whether a row with this id exists (without reading it)."""
        with self.engine.connect() as conn:
            return conn.execute(select(jobs_table.c.id).where(jobs_table.c.id == job_id)).first() is not None

    def _job(self, row: Any) -> Job:
        job = Job.__new__(Job)
        job.__setstate__(job_from_json(row.id, row.job, row.next_run_time))
        job._scheduler = self._scheduler
        job._jobstore_alias = self._alias
        return job

    def _jobs(self, *where: Any) -> list[Job]:
        stmt = select(jobs_table).where(*where).order_by(jobs_table.c.next_run_time, jobs_table.c.id)
        with self.engine.connect() as conn:
            rows = conn.execute(stmt).all()
        return [self._job(r) for r in rows]

    def lookup_job(self, job_id: str) -> Job | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(jobs_table).where(jobs_table.c.id == job_id)).first()
        return self._job(row) if row is not None else None

    def get_due_jobs(self, now: datetime) -> list[Job]:
        return self._jobs(jobs_table.c.next_run_time <= datetime_to_utc_timestamp(now))

    def get_next_run_time(self) -> datetime | None:
        stmt = select(jobs_table.c.next_run_time).where(jobs_table.c.next_run_time.is_not(None))
        with self.engine.connect() as conn:
            ts = conn.execute(stmt.order_by(jobs_table.c.next_run_time).limit(1)).scalar()
        return utc_timestamp_to_datetime(ts)

    def get_all_jobs(self) -> list[Job]:
        jobs = self._jobs()
        self._fix_paused_jobs_sorting(jobs)
        return jobs

    def add_job(self, job: Job) -> None:
        row = {"id": job.id, "next_run_time": _ts(job.next_run_time), "job": job_to_json(job)}
        try:
            with write_begin(self.engine) as conn:
                conn.execute(jobs_table.insert().values(**row))
        except IntegrityError:
            raise ConflictingIdError(job.id) from None

    def update_job(self, job: Job) -> None:
        values = {"next_run_time": _ts(job.next_run_time), "job": job_to_json(job)}
        with write_begin(self.engine) as conn:
            if conn.execute(jobs_table.update().where(jobs_table.c.id == job.id).values(**values)).rowcount == 0:
                raise JobLookupError(job.id)

    def remove_job(self, job_id: str) -> None:
        with write_begin(self.engine) as conn:
            if conn.execute(delete(jobs_table).where(jobs_table.c.id == job_id)).rowcount == 0:
                raise JobLookupError(job_id)

    def remove_all_jobs(self) -> None:
        with write_begin(self.engine) as conn:
            conn.execute(delete(jobs_table))

    def shutdown(self) -> None:
        pass  # the engine is the store's: closing the store disposes of it

    def __repr__(self) -> str:
        return f"<JsonJobStore ({TABLE} on {self.engine.url.render_as_string(hide_password=True)})>"


# ------------------------------------------------------------------------------ earlier releases' pickled rows
def _legacy_tables(engine: Engine) -> list[str]:
    insp = sa_inspect(engine)
    return [t for t in LEGACY_TABLES if insp.has_table(t) and "job_state" in {c["name"] for c in insp.get_columns(t)}]


def legacy_job_ids(engine: Engine) -> dict[str, list[str]]:
    """Per pickled table of an earlier release, the ids of its jobs not re-added since.
    Only the ``id`` column is read: a pickled ``job_state`` never is."""
    out: dict[str, list[str]] = {}
    for name in _legacy_tables(engine):
        t = Table(name, MetaData(), Column("id", Unicode(191), primary_key=True))
        with engine.connect() as conn:
            ids = [r.id for r in conn.execute(select(t.c.id).where(t.c.id.not_in(select(jobs_table.c.id))).order_by(t.c.id))]
        if ids:
            out[name] = ids
    return out


def forget_legacy_job(engine: Engine, job_id: str) -> bool:
    """Delete the pickled row ``job_id`` of an earlier release, unread; whether one was there."""
    found = False
    for name in _legacy_tables(engine):
        t = Table(name, MetaData(), Column("id", Unicode(191), primary_key=True))
        with write_begin(engine) as conn:
            found |= conn.execute(delete(t).where(t.c.id == job_id)).rowcount > 0
    return found


_warned: set[str] = set()


def _warn_legacy(engine: Engine) -> None:
    """Say once per process and database that an earlier release's pickled jobs were not loaded."""
    key = engine.url.render_as_string(hide_password=True)
    if key in _warned:
        return
    _warned.add(key)
    for table, ids in legacy_job_ids(engine).items():
        shown = ", ".join(ids[:10]) + (", ..." if len(ids) > 10 else "")
        log.warning("%d scheduled job(s) of an earlier release (%s) were not loaded: table %s holds them pickled and a pickle "
                    "is never read; re-add each with `lifelong schedule add` (`lifelong schedule remove ID` drops the old row)",
                    len(ids), shown, table)
