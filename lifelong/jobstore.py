"""The persistent job table of the scheduler: job settings, triggers, add / list / remove.

Jobs live in our own APScheduler job store on the store's database, one JSON row per job in
the table ``lifelong_schedule`` (:mod:`lifelong.jobtable`: never a pickle). Editing them needs
no running scheduler: :func:`edit_jobs` opens a scheduler that never runs a job. The job
functions themselves are in :mod:`lifelong.scheduler`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from apscheduler.job import Job
from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.base import BaseScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
from sqlalchemy import make_url, select

from expert_store import ExpertStore

from .audit_report import DEFAULT_MIN_RECALL
from .config import cycle_config
from .errors import ConfigError, LifelongError
from .jobtable import TABLE, JsonJobStore, forget_legacy_job
from .records import CycleRow, LeaseRow, create_tables, utcnow
from .workspace import open_registry

__all__ = [
    "JOB_TABLE", "KINDS", "MISFIRE_GRACE_S", "JobInfo", "JobNotFoundError", "add_poll", "add_cycle", "add_audit",
    "remove_job", "list_jobs", "schedule_status", "crontab_trigger", "job_store", "edit_jobs",
]

JOB_TABLE = TABLE
KINDS = ("poll", "cycle", "audit")
MISFIRE_GRACE_S = 300  # a run later than this (scheduler down, busy) is skipped, not run late


class JobNotFoundError(LifelongError):
    """No scheduled job has that id."""

    hint = "`lifelong schedule list` shows the job ids"


_DOW = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")


def _crontab_dow(field: str) -> str:
    """Crontab day-of-week (0 or 7 = Sunday) as names: APScheduler 3 counts 0 = Monday."""
    if not re.search(r"\d", field):
        return field
    days: set[int] = set()
    named: list[str] = []
    for part in field.split(","):
        rng, _, step = part.partition("/")
        try:
            if rng == "*":
                lo, hi = 0, 6
            elif "-" in rng:
                lo, hi = (int(x) for x in rng.split("-"))
            else:
                lo = hi = int(rng)
                if step:
                    hi = 6
            step_n = int(step or 1)
        except ValueError:
            if re.search(r"\d", rng):
                raise ConfigError(f"invalid crontab day of week {field!r}") from None
            named.append(part)  # names (mon-fri) mean the same to both
            continue
        if not (0 <= lo <= hi <= 7 and step_n > 0):
            raise ConfigError(f"invalid crontab day of week {field!r}")
        days.update(d % 7 for d in range(lo, hi + 1, step_n))
    return ",".join([_DOW[d] for d in sorted(days)] + named)


def crontab_trigger(expr: str) -> CronTrigger:
    """``CronTrigger.from_crontab`` with standard crontab weekdays (0/7 = Sunday)."""
    fields = expr.split()
    if len(fields) != 5:
        raise ConfigError(f"a crontab has 5 fields (minute hour day month weekday), got {expr!r}")
    fields[4] = _crontab_dow(fields[4])
    try:
        return CronTrigger.from_crontab(" ".join(fields))
    except ValueError as exc:
        raise ConfigError(f"invalid crontab {expr!r}: {exc}") from exc


def _trigger(every_s: float | None, cron: str | None) -> IntervalTrigger | CronTrigger:
    if (every_s is None) == (cron is None):
        raise ConfigError("give exactly one of an interval (every_s) or a crontab (cron)")
    if cron is not None:
        return crontab_trigger(cron)
    if not every_s or every_s <= 0:
        raise ConfigError(f"the interval must be positive, got {every_s}")
    return IntervalTrigger(seconds=every_s)


def describe_trigger(trigger: Any) -> str:
    if isinstance(trigger, IntervalTrigger):
        return f"every {trigger.interval.total_seconds():g} s"
    if isinstance(trigger, CronTrigger):
        f = {x.name: str(x) for x in trigger.fields}
        return f"cron {f['minute']} {f['hour']} {f['day']} {f['month']} {f['day_of_week']}"
    return str(trigger)


# ------------------------------------------------------------------------------ job store
def _store_ref(store: ExpertStore) -> dict[str, Any]:
    """Plain kwargs that reopen ``store`` in another process: its path, and its database URL
    when it is not the store's default one."""
    return {"store": str(store.path.resolve()), "url": store.url}


def job_store(store: ExpertStore) -> JsonJobStore:
    return JsonJobStore(store.engine)


class _Admin(BaseScheduler):
    """A scheduler that never runs (nor advances) a job: only edits the job table."""

    def wakeup(self) -> None:
        pass

    def shutdown(self, wait: bool = True) -> None:  # abstract in BaseScheduler: needed to instantiate
        super().shutdown(wait)

    def _process_jobs(self):  # type: ignore[override]
        return None


@contextmanager
def edit_jobs(store: ExpertStore) -> Iterator[BaseScheduler]:
    """A paused scheduler on the persistent job table: adds and removes go straight to the
    database and are picked up by any running or later ``schedule run``. (Not APScheduler's
    ``BackgroundScheduler``: its loop processes due jobs once more on shutdown, which would
    consume their runs.)"""
    sched = _Admin(jobstores={"default": job_store(store)})
    sched.start(paused=True)
    try:
        yield sched
    finally:
        sched.shutdown(wait=False)


@dataclass
class JobInfo:
    id: str
    kind: str
    trigger: str
    next_run: datetime | None  # None: paused
    description: str
    kwargs: dict[str, Any]
    replaced: bool = False

    @classmethod
    def from_job(cls, job: Job, replaced: bool = False) -> JobInfo:
        return cls(job.id, job.id.split(":")[0], describe_trigger(job.trigger), job.next_run_time, job.name, dict(job.kwargs), replaced)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["next_run"] = self.next_run.isoformat(timespec="seconds") if self.next_run else None
        if d["kwargs"].get("url"):
            d["kwargs"]["url"] = make_url(d["kwargs"]["url"]).render_as_string(hide_password=True)
        return d


def _add(store: ExpertStore, job_id: str, func: str, trigger: Any, kwargs: dict[str, Any], name: str, misfire_grace_s: float | None) -> JobInfo:
    if misfire_grace_s is not None:
        if misfire_grace_s < 1:
            raise ConfigError(f"the misfire grace must be >= 1 s (or None: run however late), got {misfire_grace_s}")
        misfire_grace_s = int(misfire_grace_s)  # APScheduler wants an int
    with edit_jobs(store) as sched:
        replaced = job_store(store).has_job(job_id)  # a row that cannot be loaded is replaced too
        job = sched.add_job(
            func, trigger, id=job_id, name=name, kwargs=kwargs, replace_existing=True,
            coalesce=True, max_instances=1, misfire_grace_time=misfire_grace_s,
        )
        return JobInfo.from_job(job, replaced)


def _cycle_kwargs(store: ExpertStore, stream: str, settings: Mapping[str, Any] | None, device: str | None,
                  tensorboard: bool) -> dict[str, Any]:
    """A cycle job's kwargs; the stream and the settings are checked now, not at 3 am."""
    open_registry(store, progress=False).get(stream)
    settings = {k: v for k, v in (settings or {}).items() if v is not None}
    cycle_config(settings)  # unknown or invalid settings fail here
    return {**_store_ref(store), "stream": stream, "settings": settings, "device": device, "tensorboard": bool(tensorboard)}


def add_poll(store: ExpertStore, stream: str, *, every_s: float, min_tokens: int, settings: Mapping[str, Any] | None = None,
             device: str | None = None, tensorboard: bool = True, misfire_grace_s: float | None = MISFIRE_GRACE_S) -> JobInfo:
    """Every ``every_s`` seconds: a cycle on ``stream`` when >= ``min_tokens`` tokens are pending.

    ``settings`` are cycle settings by name (:func:`lifelong.config.cycle_config`)."""
    if min_tokens < 1:
        raise ConfigError(f"min_tokens must be >= 1, got {min_tokens}")
    kw = _cycle_kwargs(store, stream, settings, device, tensorboard) | {"min_tokens": int(min_tokens)}
    name = f"cycle on '{stream}' when >= {min_tokens} tokens are pending (policy {cycle_config(kw['settings']).policy})"
    return _add(store, f"poll:{stream}", "lifelong.scheduler:poll_job", _trigger(every_s, None), kw, name, misfire_grace_s)


def add_cycle(store: ExpertStore, stream: str, *, every_s: float | None = None, cron: str | None = None,
              settings: Mapping[str, Any] | None = None, device: str | None = None, tensorboard: bool = True,
              misfire_grace_s: float | None = MISFIRE_GRACE_S) -> JobInfo:
    """A cycle on ``stream`` every ``every_s`` seconds or on a crontab (``"0 3 * * *"``)."""
    kw = _cycle_kwargs(store, stream, settings, device, tensorboard)
    name = f"cycle on '{stream}' (policy {cycle_config(kw['settings']).policy})"
    return _add(store, f"cycle:{stream}", "lifelong.scheduler:cycle_job", _trigger(every_s, cron), kw, name, misfire_grace_s)


def add_audit(store: ExpertStore, *, every_s: float | None = None, cron: str | None = None, max_queries: int = 2048,
              min_recall: float = DEFAULT_MIN_RECALL, misfire_grace_s: float | None = MISFIRE_GRACE_S) -> JobInfo:
    """Audit HEAD's retrieval on held-out text once per new HEAD version (checked on a schedule)."""
    kw = {**_store_ref(store), "max_queries": int(max_queries), "min_recall": float(min_recall)}
    name = f"audit each new HEAD ({max_queries} query tokens, min recall {min_recall:.7g})"
    return _add(store, "audit", "lifelong.scheduler:audit_job", _trigger(every_s, cron), kw, name, misfire_grace_s)


def remove_job(store: ExpertStore, job_id: str) -> None:
    """Remove job ``job_id`` (its row is deleted unread, so a row that cannot be loaded goes
    too), and an earlier release's pickled row of that id."""
    legacy = forget_legacy_job(store.engine, job_id)
    with edit_jobs(store) as sched:
        try:
            sched.remove_job(job_id)
        except JobLookupError as exc:
            if not legacy:
                raise JobNotFoundError(f"no scheduled job '{job_id}'") from exc


def list_jobs(store: ExpertStore) -> list[JobInfo]:
    with edit_jobs(store) as sched:
        return [JobInfo.from_job(j) for j in sched.get_jobs()]


def schedule_status(store: ExpertStore, last: int = 5) -> dict[str, Any]:
    """Jobs, held leases (``cycle``, ``scheduler``) and the last ``last`` rows of ``lifelong_cycles``."""
    jobs = list_jobs(store)
    create_tables(store.engine)
    now = utcnow()
    with store.engine.connect() as conn:
        leases = conn.execute(select(LeaseRow)).all()
        cycles = conn.execute(select(CycleRow.__table__).order_by(CycleRow.id.desc()).limit(last)).mappings().all()
    return {
        "jobs": [j.to_dict() for j in jobs],
        "leases": [{"name": r.name, "holder": r.holder, "acquired_at": r.acquired_at.isoformat(timespec="seconds"),
                    "expires_at": r.expires_at.isoformat(timespec="seconds"), "expired": r.expires_at < now} for r in leases],
        "cycles": [{k: (v.isoformat(timespec="seconds") if isinstance(v, datetime) else v) for k, v in c.items()} for c in reversed(cycles)],
    }
