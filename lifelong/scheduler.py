"""APScheduler adapter: persistent jobs that call :func:`lifelong.cycle.run_cycle`.

Jobs live as JSON rows (table ``lifelong_schedule``; :class:`lifelong.jobtable.JsonJobStore`,
never a pickle) on the store's own database, so they survive restarts and can be added or
removed while no scheduler runs (:mod:`lifelong.jobstore`). Each job is one of the three
module-level functions below with plain kwargs (store path, stream, settings), and does
nothing but decide whether a cycle is due and call ``run_cycle``:

- ``poll:<stream>``  -- every N seconds: a cycle when the stream's pending tokens (after
  HEAD's committed cursor) reach a threshold;
- ``cycle:<stream>`` -- a cycle on an interval or a crontab;
- ``audit``          -- audit HEAD's retrieval (:func:`lifelong.audit_version.audit_version`) once per
  new HEAD version, results in ``lifelong_audits``.

Cycles are serialised by the database lease ``cycle`` (taken by ``run_cycle``, shared with
the CLI): a job that finds it held logs and skips. One scheduler process per store holds
the lease ``scheduler``; on start it releases the leases of dead processes of this host and
closes the cycle rows they left 'running' (:func:`lifelong.records.recover_cycles`).
SIGTERM/SIGINT (or :func:`request_stop`) make a running cycle stop at its next training
step (``CycleInterrupted``: no version written), then the scheduler shuts down waiting for
its jobs.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any

from apscheduler.events import EVENT_SCHEDULER_STARTED
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.base import JobLookupError
from apscheduler.jobstores.memory import MemoryJobStore
from apscheduler.schedulers.base import STATE_STOPPED, BaseScheduler
from apscheduler.schedulers.blocking import BlockingScheduler

from expert_store import ExpertStore

from .audit_report import DEFAULT_MIN_RECALL
from .config import cycle_config
from .cycle import CycleInterrupted, HeadMovedError, NothingPendingError, run_cycle
from .jobstore import edit_jobs, job_store, list_jobs
from .records import (Lease, LeaseHeldError, committed_outcome, create_tables, holder_name, is_audited, recover_cycles,
                      release_dead_leases)
from .workspace import open_registry, tensorboard_dir

__all__ = ["run_scheduler", "request_stop", "stop_requested", "poll_job", "cycle_job", "audit_job"]

log = logging.getLogger("lifelong.scheduler")

SCHEDULER_LEASE_TTL_S = 60.0  # a dead scheduler's lease expires after this
REFRESH_S = 10.0  # a running scheduler re-reads the job table at least this often

_stop = threading.Event()


def request_stop() -> None:
    """Ask the running scheduler (and its running cycle) to stop; safe from a signal handler."""
    _stop.set()


def stop_requested() -> bool:
    return _stop.is_set()


# ------------------------------------------------------------------------------ jobs
def _cycle(st: ExpertStore, stream: str, settings: Mapping[str, Any] | None, job: str, device: str | None, tensorboard: bool) -> dict[str, Any]:
    monitor = None
    if tensorboard:
        from .monitor import Monitor

        monitor = Monitor(tensorboard_dir(st))
    try:
        r = run_cycle(st, open_registry(st, progress=False), stream, cycle_config(settings), device=device, monitor=monitor,
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
    except HeadMovedError as exc:
        log.warning("%s: %s", job, exc)
        return {"status": "head-moved", "cycle": exc.cycle_id, "version": exc.version, "ref": exc.ref, "message": str(exc)}
    finally:
        if monitor is not None:
            monitor.close()
    status = "committed" if r.accepted else "candidate"
    log.info("%s: cycle %d %s version %d (parent %s, ref %s) in %.1f s", job, r.cycle_id, status, r.version, r.parent, r.ref, r.seconds)
    return {"status": status, "cycle": r.cycle_id, "version": r.version, "ref": r.ref}


def poll_job(store: str, stream: str, min_tokens: int, settings: dict[str, Any] | None = None, url: str | None = None,
             device: str | None = None, tensorboard: bool = True) -> dict[str, Any]:
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
        return {**_cycle(st, stream, settings, job, device, tensorboard), "pending_tokens": tokens}


def cycle_job(store: str, stream: str, settings: dict[str, Any] | None = None, url: str | None = None,
              device: str | None = None, tensorboard: bool = True) -> dict[str, Any]:
    """Run a cycle on ``stream`` (the schedule says it is due)."""
    if _stop.is_set():
        return {"status": "stopping"}
    with ExpertStore.open(store, url=url) as st:
        return _cycle(st, stream, settings, f"cycle:{stream}", device, tensorboard)


def audit_job(store: str, url: str | None = None, max_queries: int = 2048, min_recall: float = DEFAULT_MIN_RECALL) -> dict[str, Any]:
    """Audit HEAD's product-key retrieval against FAISS exact search, once per HEAD version."""
    from .audit_report import AuditError
    from .audit_version import audit_version

    if _stop.is_set():
        return {"status": "stopping"}
    with ExpertStore.open(store, url=url) as st:
        head = st.head()
        if head is not None and is_audited(st.engine, head):
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


def _lease_lost(exc: LeaseHeldError) -> None:
    log.error("%s: stopping", exc)
    request_stop()


def _heartbeat(lease: Lease) -> None:
    try:
        lease.renew()
    except LeaseHeldError as exc:
        _lease_lost(exc)


def _serve(store: ExpertStore, lease: Lease, refresh_s: float) -> None:
    sched = _Scheduler(
        jobstores={"default": job_store(store), "local": MemoryJobStore()},
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
    with edit_jobs(store) as sched:
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
            with edit_jobs(store) as sched:
                try:
                    if nxt is None:  # the trigger is exhausted, as a running scheduler would drop it
                        sched.remove_job(job.id)
                    else:
                        sched.modify_job(job.id, next_run_time=nxt)
                except JobLookupError:
                    pass  # removed meanwhile
        results.append({"job": job.id, **res})
    return results


def _recover(store: ExpertStore) -> None:
    """What a killed process of this host left: its leases are released, its 'running' cycle
    rows closed ('committed'/'candidate' when its version made it, else 'abandoned')."""
    release_dead_leases(store.engine)
    recover_cycles(store.engine, committed_outcome(store))  # logs each row it closes


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
    try:
        _recover(store)
        with _signals(install_signals):
            if once:  # no scheduler loop (and no heartbeat job): renew the lease from a thread
                with lease.keep_alive(refresh_s, on_lost=_lease_lost):
                    return _run_once(store)
            _serve(store, lease, refresh_s)
            return []
    finally:
        lease.release()
