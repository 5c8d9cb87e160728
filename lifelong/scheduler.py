"""APScheduler adapter: persistent jobs that call :func:`lifelong.cycle.run_cycle`.

Jobs live in an APScheduler ``SQLAlchemyJobStore`` (table ``lifelong_jobs``) on the
store's own database, so they survive restarts and can be added or removed while no
scheduler runs. Each job is a module-level function named by textual reference
(``lifelong.scheduler:poll_job``) with plain kwargs (store path, stream, settings), and
does nothing but decide whether a cycle is due and call ``run_cycle``:

- ``poll:<stream>``  -- every N seconds: a cycle when the stream's pending tokens (after
  HEAD's committed cursor) reach a threshold;
- ``cycle:<stream>`` -- a cycle on an interval or a crontab;
- ``audit``          -- audit HEAD's retrieval (:func:`lifelong.audit.audit_model`) once per
  new HEAD version, results in ``lifelong_audits``.

Cycles are serialised by the database lease ``cycle`` (taken by ``run_cycle``, shared with
the CLI): a job that finds it held logs and skips. One scheduler process per store holds
the lease ``scheduler``. SIGTERM/SIGINT (or :func:`request_stop`) make a running cycle stop
at its next training step (``CycleInterrupted``: no version written), then the scheduler
shuts down waiting for its jobs.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import signal
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from apscheduler.events import EVENT_SCHEDULER_STARTED
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.job import Job
from apscheduler.jobstores.base import JobLookupError
from apscheduler.jobstores.memory import MemoryJobStore
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.base import STATE_STOPPED, BaseScheduler
from apscheduler.schedulers.blocking import BlockingScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
from sqlalchemy import make_url, select

from expert_store import ExpertStore

from .config import TrainConfig
from .cycle import CycleConfig, CycleInterrupted, NothingPendingError, run_cycle
from .errors import ConfigError, LifelongError
from .records import AuditRow, CycleRow, Lease, LeaseHeldError, LeaseRow, create_tables, holder_name, utcnow
from .workspace import open_registry, tensorboard_dir

__all__ = [
    "JOB_TABLE", "KINDS", "MISFIRE_GRACE_S", "JobInfo", "JobNotFoundError",
    "add_poll", "add_cycle", "add_audit", "remove_job", "list_jobs", "schedule_status",
    "run_scheduler", "request_stop", "stop_requested", "cycle_config", "crontab_trigger",
    "poll_job", "cycle_job", "audit_job",
]

log = logging.getLogger("lifelong.scheduler")

JOB_TABLE = "lifelong_jobs"
KINDS = ("poll", "cycle", "audit")
MISFIRE_GRACE_S = 300  # a run later than this (scheduler down, busy) is skipped, not run late
SCHEDULER_LEASE_TTL_S = 60.0  # a dead scheduler's lease expires after this
REFRESH_S = 10.0  # a running scheduler re-reads the job table at least this often

_TRAIN_KEYS = {f.name for f in dataclasses.fields(TrainConfig)} - {"steps", "seed"}
_CYCLE_KEYS = {f.name for f in dataclasses.fields(CycleConfig)} - {"train"}
_RUN_KEYS = ("device", "tensorboard")  # job settings that are run_cycle arguments, not CycleConfig fields
_stop = threading.Event()


class JobNotFoundError(LifelongError):
    """No scheduled job has that id."""

    hint = "`lifelong schedule list` shows the job ids"


def request_stop() -> None:
    """Ask the running scheduler (and its running cycle) to stop; safe from a signal handler."""
    _stop.set()


def stop_requested() -> bool:
    return _stop.is_set()


# ------------------------------------------------------------------------------ settings
def cycle_config(settings: Mapping[str, Any] | None) -> CycleConfig:
    """A ``CycleConfig`` from a job's flat settings (CycleConfig fields + TrainConfig knobs)."""
    settings = dict(settings or {})
    for key in _RUN_KEYS:
        settings.pop(key, None)
    unknown = sorted(set(settings) - _CYCLE_KEYS - _TRAIN_KEYS)
    if unknown:
        raise ConfigError(f"unknown cycle setting(s) {', '.join(unknown)}")
    train = {k: settings.pop(k) for k in list(settings) if k not in _CYCLE_KEYS}
    return CycleConfig(**settings, train=TrainConfig(**train))


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
    """Plain kwargs that reopen ``store`` in another process: its path, and its URL only
    when the database is not the default ``store.db`` inside it."""
    url = store.engine.url
    path = Path(store.path).resolve()
    if url.get_backend_name() == "sqlite" and url.database and Path(url.database).resolve() == path / "store.db":
        return {"store": str(path), "url": None}
    return {"store": str(path), "url": url.render_as_string(hide_password=False)}


def _job_store(store: ExpertStore) -> SQLAlchemyJobStore:
    return SQLAlchemyJobStore(engine=store.engine, tablename=JOB_TABLE)


class _Admin(BaseScheduler):
    """A scheduler that never runs (nor advances) a job: only edits the job table."""

    def wakeup(self) -> None:
        pass

    def shutdown(self, wait: bool = True) -> None:
        super().shutdown(wait)

    def _process_jobs(self):  # type: ignore[override]
        return None


@contextmanager
def _jobs(store: ExpertStore) -> Iterator[BaseScheduler]:
    """A paused scheduler on the persistent job table: adds and removes go straight to the
    database and are picked up by any running or later ``schedule run``. (Not APScheduler's
    ``BackgroundScheduler``: its loop processes due jobs once more on shutdown, which would
    consume their runs.)"""
    sched = _Admin(jobstores={"default": _job_store(store)})
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
    with _jobs(store) as sched:
        replaced = sched.get_job(job_id) is not None
        job = sched.add_job(
            func, trigger, id=job_id, name=name, kwargs=kwargs, replace_existing=True,
            coalesce=True, max_instances=1, misfire_grace_time=misfire_grace_s,
        )
        return JobInfo.from_job(job, replaced)


def _check_stream(store: ExpertStore, stream: str, settings: Mapping[str, Any] | None) -> dict[str, Any]:
    open_registry(store, progress=False).get(stream)  # unknown stream: clear error now, not at 3 am
    cfg = cycle_config(settings)
    return {k: v for k, v in (settings or {}).items() if v is not None} | {"policy": cfg.policy}


def add_poll(store: ExpertStore, stream: str, *, every_s: float, min_tokens: int, settings: Mapping[str, Any] | None = None,
             misfire_grace_s: float | None = MISFIRE_GRACE_S) -> JobInfo:
    """Every ``every_s`` seconds: a cycle on ``stream`` when >= ``min_tokens`` tokens are pending."""
    if min_tokens < 1:
        raise ConfigError(f"min_tokens must be >= 1, got {min_tokens}")
    s = _check_stream(store, stream, settings)
    name = f"cycle on '{stream}' when >= {min_tokens} tokens are pending (policy {s['policy']})"
    kw = {**_store_ref(store), "stream": stream, "min_tokens": int(min_tokens), "settings": s}
    return _add(store, f"poll:{stream}", "lifelong.scheduler:poll_job", _trigger(every_s, None), kw, name, misfire_grace_s)


def add_cycle(store: ExpertStore, stream: str, *, every_s: float | None = None, cron: str | None = None,
              settings: Mapping[str, Any] | None = None, misfire_grace_s: float | None = MISFIRE_GRACE_S) -> JobInfo:
    """A cycle on ``stream`` every ``every_s`` seconds or on a crontab (``"0 3 * * *"``)."""
    s = _check_stream(store, stream, settings)
    kw = {**_store_ref(store), "stream": stream, "settings": s}
    name = f"cycle on '{stream}' (policy {s['policy']})"
    return _add(store, f"cycle:{stream}", "lifelong.scheduler:cycle_job", _trigger(every_s, cron), kw, name, misfire_grace_s)


def add_audit(store: ExpertStore, *, every_s: float | None = None, cron: str | None = None, max_queries: int = 2048,
              min_recall: float = 1.0, misfire_grace_s: float | None = MISFIRE_GRACE_S) -> JobInfo:
    """Audit HEAD's retrieval on held-out text once per new HEAD version (checked on a schedule)."""
    kw = {**_store_ref(store), "max_queries": int(max_queries), "min_recall": float(min_recall)}
    name = f"audit each new HEAD ({max_queries} query tokens, min recall {min_recall:g})"
    return _add(store, "audit", "lifelong.scheduler:audit_job", _trigger(every_s, cron), kw, name, misfire_grace_s)


def remove_job(store: ExpertStore, job_id: str) -> None:
    with _jobs(store) as sched:
        try:
            sched.remove_job(job_id)
        except JobLookupError as exc:
            raise JobNotFoundError(f"no scheduled job '{job_id}'") from exc


def list_jobs(store: ExpertStore) -> list[JobInfo]:
    with _jobs(store) as sched:
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


# ------------------------------------------------------------------------------ jobs
def _cycle(st: ExpertStore, stream: str, settings: Mapping[str, Any] | None, job: str) -> dict[str, Any]:
    settings = settings or {}
    monitor = None
    if settings.get("tensorboard", True):
        from .monitor import Monitor

        monitor = Monitor(tensorboard_dir(st))
    try:
        r = run_cycle(st, open_registry(st, progress=False), stream, cycle_config(settings), device=settings.get("device"), monitor=monitor,
                      progress=False, should_stop=_stop.is_set, holder=holder_name("scheduler"), log=log.info)
    except LeaseHeldError as exc:
        log.warning("%s: skipped: %s", job, exc)
        return {"status": "lease-held", "message": str(exc)}
    except NothingPendingError as exc:
        log.info("%s: %s", job, exc)
        return {"status": "nothing-pending", "message": str(exc)}
    except CycleInterrupted as exc:
        log.warning("%s: %s", job, exc)
        return {"status": "interrupted", "message": str(exc)}
    finally:
        if monitor is not None:
            monitor.close()
    status = "committed" if r.accepted else "candidate"
    log.info("%s: cycle %d %s version %d (parent %s, ref %s) in %.1f s", job, r.cycle_id, status, r.version, r.parent, r.ref, r.seconds)
    return {"status": status, "cycle": r.cycle_id, "version": r.version, "ref": r.ref}


def poll_job(store: str, stream: str, min_tokens: int, settings: dict[str, Any] | None = None, url: str | None = None) -> dict[str, Any]:
    """Run a cycle on ``stream`` if at least ``min_tokens`` tokens are pending after HEAD's cursor."""
    job = f"poll:{stream}"
    if _stop.is_set():
        return {"status": "stopping"}
    with ExpertStore.open(store, url=url) as st:
        cursor = st.version("HEAD").cursors.get(stream)
        pending = open_registry(st, progress=False).pending(stream, cursor)
        tokens = pending.tokens or 0
        if tokens < min_tokens:
            log.info("%s: %d tokens pending < %d: no cycle", job, tokens, min_tokens)
            return {"status": "below-threshold", "pending_tokens": tokens}
        log.info("%s: %d tokens pending >= %d: starting a cycle", job, tokens, min_tokens)
        return {**_cycle(st, stream, settings, job), "pending_tokens": tokens}


def cycle_job(store: str, stream: str, settings: dict[str, Any] | None = None, url: str | None = None) -> dict[str, Any]:
    """Run a cycle on ``stream`` (the schedule says it is due)."""
    if _stop.is_set():
        return {"status": "stopping"}
    with ExpertStore.open(store, url=url) as st:
        return _cycle(st, stream, settings, f"cycle:{stream}")


def audit_job(store: str, url: str | None = None, max_queries: int = 2048, min_recall: float = 1.0) -> dict[str, Any]:
    """Audit HEAD's product-key retrieval against FAISS exact search, once per HEAD version."""
    from .audit import AuditError
    from .auditing import audit_version

    if _stop.is_set():
        return {"status": "stopping"}
    with ExpertStore.open(store, url=url) as st:
        head = st.head()
        create_tables(st.engine)
        with st.engine.connect() as conn:
            if conn.execute(select(AuditRow.id).where(AuditRow.version == head)).first() is not None:
                log.info("audit: version %s is already audited", head)
                return {"status": "already-audited", "version": head}
        try:
            report = audit_version(st, open_registry(st, progress=False), head, max_queries=max_queries, progress=False)
        except AuditError as exc:
            log.info("audit: version %s skipped: %s", head, exc)
            return {"status": "no-heldout", "version": head}
        passed = report.passed(min_recall)
        (log.info if passed else log.error)("audit: version %s recall up to ties %.4f (%s, threshold %g)", head,
                                            report.min_recall, "passed" if passed else "FAILED", min_recall)
        return {"status": "passed" if passed else "failed-audit", "version": head, "recall": report.min_recall}


# ------------------------------------------------------------------------------ running
class _Scheduler(BlockingScheduler):
    def _process_jobs(self):  # type: ignore[override]
        if _stop.is_set() or self.state == STATE_STOPPED:  # stopping: hand out (and advance) no more runs
            return None
        return super()._process_jobs()


@contextmanager
def _signals(install: bool) -> Iterator[None]:
    if not install or threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: Any) -> None:
        if not _stop.is_set():
            log.warning("%s: stopping (a running cycle stops at its next step; no version is written)", signal.Signals(signum).name)
        request_stop()

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _heartbeat(lease: Lease) -> None:
    try:
        lease.renew()
    except LeaseHeldError as exc:
        log.error("%s: stopping", exc)
        request_stop()


def _serve(store: ExpertStore, lease: Lease, refresh_s: float) -> None:
    sched = _Scheduler(
        jobstores={"default": _job_store(store), "local": MemoryJobStore()},
        executors={"default": ThreadPoolExecutor(1), "local": ThreadPoolExecutor(1)},  # cycles queue, never collide
    )
    # Wakes the loop at least every refresh_s (jobs added by other processes) and renews the lease.
    sched.add_job(_heartbeat, "interval", args=[lease], seconds=min(refresh_s, lease.ttl_s / 3), id="heartbeat",
                  jobstore="local", executor="local", coalesce=True, max_instances=1)
    stopper = threading.Thread(target=_shutdown_on_stop, args=(sched,), name="lifelong-scheduler-stop", daemon=True)
    sched.add_listener(lambda _e: stopper.start(), EVENT_SCHEDULER_STARTED)
    log.info("scheduler running on %s (%d jobs); SIGTERM or Ctrl-C stops it", store.path, len(list_jobs(store)))
    try:
        sched.start()
    finally:
        _stop.set()
        if stopper.is_alive():
            stopper.join()
    log.info("scheduler stopped")


def _shutdown_on_stop(sched: BaseScheduler) -> None:
    _stop.wait()
    if sched.state != STATE_STOPPED:
        sched.shutdown(wait=True)  # the running cycle sees should_stop and ends without a version


def _run_once(store: ExpertStore) -> list[dict[str, Any]]:
    """Each poll job once (a poll is a check), then each cycle/audit job whose run time has come."""
    now = datetime.now(timezone.utc)
    with _jobs(store) as sched:
        jobs = sched.get_jobs()
    jobs.sort(key=lambda j: (j.id == "audit", j.id))
    results = []
    for job in jobs:
        kind = job.id.split(":")[0]
        due = job.next_run_time is not None and (kind == "poll" or job.next_run_time <= now)
        if _stop.is_set() or not due:
            results.append({"job": job.id, "status": "stopping" if _stop.is_set() else "not-due",
                            "next_run": job.next_run_time.isoformat(timespec="seconds") if job.next_run_time else None})
            continue
        try:
            res = job.func(*job.args, **job.kwargs)
        except Exception as exc:  # one failing job does not keep the others from running
            log.error("%s: failed: %s", job.id, exc)
            res = {"status": "failed", "message": str(exc)}
        if kind != "poll":  # consume this run, as a running scheduler would
            nxt = job.trigger.get_next_fire_time(job.next_run_time, now)
            while nxt is not None and nxt <= now:
                nxt = job.trigger.get_next_fire_time(nxt, now)
            with _jobs(store) as sched:
                try:
                    if nxt is None:  # the trigger is exhausted, as a running scheduler would drop it
                        sched.remove_job(job.id)
                    else:
                        sched.modify_job(job.id, next_run_time=nxt)
                except JobLookupError:
                    pass  # removed meanwhile
        results.append({"job": job.id, **res})
    return results


def run_scheduler(store: ExpertStore, *, once: bool = False, wait_s: float = 0.0, install_signals: bool = True,
                  refresh_s: float = REFRESH_S) -> list[dict[str, Any]]:
    """Run the persisted jobs until SIGTERM/SIGINT/:func:`request_stop` (or, with ``once``,
    each due job one time). Takes the ``scheduler`` lease: one scheduler per store.
    Returns the results of the jobs run (``once``) or an empty list."""
    _stop.clear()
    create_tables(store.engine)
    lease = Lease(store.engine, "scheduler", holder=holder_name("scheduler"), ttl_s=SCHEDULER_LEASE_TTL_S, wait_s=wait_s)
    try:
        lease.acquire()
    except LeaseHeldError as exc:
        msg = str(exc).replace("another cycle is running", "a scheduler is running")
        raise LeaseHeldError(msg if msg != str(exc) else f"a scheduler is running on this store: {exc}") from exc
    done = threading.Event()
    try:
        with _signals(install_signals):
            if once:  # no scheduler loop (and no heartbeat job): renew the lease from a thread
                threading.Thread(target=_renew_until, args=(lease, done, refresh_s), daemon=True).start()
                return _run_once(store)
            _serve(store, lease, refresh_s)
            return []
    finally:
        done.set()
        lease.release()


def _renew_until(lease: Lease, done: threading.Event, every_s: float) -> None:
    while not done.wait(min(every_s, lease.ttl_s / 3)):
        _heartbeat(lease)
