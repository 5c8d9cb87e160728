"""Schedule verbs: schedule add (poll | cycle | audit), list, remove, status, run.

Thin over :mod:`lifelong.scheduler`: jobs are kept in the store's database, so adding or
removing them works whether or not a scheduler runs, and the next ``schedule run`` (or the
running one, within seconds) picks them up.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from .. import jobstore, scheduler
from ..audit_report import DEFAULT_MIN_RECALL
from ..config import add_cycle_flags, cycle_settings
from .common import add_parser, open_store, print_json, print_table


def _print_job(job: jobstore.JobInfo, args: argparse.Namespace) -> None:
    if args.json:
        print_json(job.to_dict())
        return
    nxt = f"{job.next_run:%Y-%m-%d %H:%M:%S %Z}" if job.next_run else "paused"
    print(f"{'replaced' if job.replaced else 'added'} job {job.id}: {job.trigger}, {job.description}; next run {nxt}")


def cmd_add(args: argparse.Namespace) -> int:
    store = open_store(args)
    every, grace = getattr(args, "every", None), args.misfire_grace
    if args.kind == "audit":
        job = jobstore.add_audit(store, every_s=every, cron=args.cron, max_queries=args.queries, min_recall=args.min_recall, misfire_grace_s=grace)
    else:
        run = dict(settings=cycle_settings(args), device=args.device, tensorboard=args.tensorboard, misfire_grace_s=grace)
        if args.kind == "poll":
            job = jobstore.add_poll(store, args.stream, every_s=every, min_tokens=args.min_tokens, **run)
        else:
            job = jobstore.add_cycle(store, args.stream, every_s=every, cron=args.cron, **run)
    _print_job(job, args)
    return 0


def _job_rows(jobs: list[dict[str, Any]]) -> list[tuple]:
    return [(j["id"], j["kind"], j["trigger"], j["next_run"] or "paused", j["description"]) for j in jobs]


def cmd_list(args: argparse.Namespace) -> int:
    jobs = [j.to_dict() for j in jobstore.list_jobs(open_store(args))]
    if args.json:
        print_json(jobs)
    elif not jobs:
        print(f"no scheduled jobs; add one with `lifelong --store {args.store} schedule add poll STREAM --every 60 --min-tokens 100000`")
    else:
        print_table(["id", "kind", "trigger", "next run", "what"], _job_rows(jobs))
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    jobstore.remove_job(open_store(args), args.id)
    print(f"removed job {args.id}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    st = jobstore.schedule_status(open_store(args), last=args.last)
    if args.json:
        print_json(st)
        return 0
    print(f"jobs ({len(st['jobs'])}):")
    if st["jobs"]:
        print_table(["id", "kind", "trigger", "next run", "what"], _job_rows(st["jobs"]))
    if st["leases"]:
        for lease in st["leases"]:
            state = "expired" if lease["expired"] else f"until {lease['expires_at']}"
            print(f"lease '{lease['name']}': held by {lease['holder']} since {lease['acquired_at']} UTC ({state})")
    else:
        print("leases: none held (no cycle and no scheduler running)")
    print(f"last {len(st['cycles'])} cycles:")
    rows = [(c["id"], c["stream"], c["policy"], c["status"], c["started_at"], c["finished_at"], c["parent_version"], c["version"], c["holder"])
            for c in st["cycles"]]
    if rows:
        print_table(["cycle", "stream", "policy", "status", "started (UTC)", "finished (UTC)", "parent", "version", "holder"], rows)
    return 0


class _Stderr(logging.StreamHandler):
    """Logs to whatever ``sys.stderr`` is now (tests swap it)."""

    @property  # type: ignore[override]
    def stream(self):  # noqa: D102
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


def _setup_logging(verbose: bool) -> None:
    ours = logging.getLogger("lifelong")
    if not any(isinstance(h, _Stderr) for h in ours.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        ours.addHandler(handler)
        logging.getLogger("apscheduler").addHandler(handler)
    ours.setLevel(logging.INFO)
    aps = logging.getLogger("apscheduler")
    aps.setLevel(logging.INFO if verbose else logging.WARNING)
    sched_log = logging.getLogger("apscheduler.scheduler")  # logger filters do not see child loggers' records
    for f in [f for f in sched_log.filters if isinstance(f, _Busy)]:
        sched_log.removeFilter(f)
    if not verbose:
        sched_log.addFilter(_Busy())


class _Busy(logging.Filter):
    """Hide APScheduler's "skipped: maximum number of running instances" (a poll while its
    cycle runs): expected, and logged every interval for as long as the cycle takes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "maximum number of running instances" not in record.getMessage()


def cmd_run(args: argparse.Namespace) -> int:
    _setup_logging(args.verbose)
    store = open_store(args)
    results = scheduler.run_scheduler(store, once=args.once, wait_s=args.wait)
    if not args.once:
        return 0
    if args.json:
        print_json(results)
    else:
        for r in results:
            extra = ", ".join(f"{k} {v}" for k, v in r.items() if k not in ("job", "status", "message") and v is not None)
            print(f"{r['job']}: {r['status']}" + (f" ({extra})" if extra else "") + (f": {r['message']}" if r.get("message") else ""))
    return 1 if any(r["status"] == "failed" for r in results) else 0


def _cycle_flags(p: argparse.ArgumentParser) -> None:
    add_cycle_flags(p)
    p.add_argument("--device", help="torch device (default: GPU if there is one)")
    p.add_argument("--no-tensorboard", dest="tensorboard", action="store_false",
                   help="write no TensorBoard events (default: STORE/tensorboard)")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--misfire-grace", type=int, default=jobstore.MISFIRE_GRACE_S, metavar="SECONDS",
                   help="a run later than this (scheduler down or busy) is skipped (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print the job as JSON")


def _when(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--every", type=float, metavar="SECONDS", help="run on this interval")
    g.add_argument("--cron", metavar="EXPR", help='run on a crontab, e.g. "0 3 * * *" (local time; 0 = Sunday)')


def register(sub: argparse._SubParsersAction) -> None:
    group = add_parser(sub, "schedule", "schedule growth cycles and audits (jobs persist in the store's database)",
                       "lifelong --store ./store schedule add poll news --every 60 --min-tokens 100000")
    verbs = group.add_subparsers(dest="verb", metavar="VERB", required=True)

    p = add_parser(verbs, "add", "add or replace a job (job ids: poll:STREAM, cycle:STREAM, audit)",
                   'lifelong --store ./store schedule add cycle news --cron "0 3 * * *" --policy freeze-all')
    kinds = p.add_subparsers(dest="kind", metavar="KIND", required=True)
    k = add_parser(kinds, "poll", "check a stream on an interval; run a cycle when enough tokens are pending",
                   "lifelong --store ./store schedule add poll news --every 60 --min-tokens 100000")
    k.add_argument("stream")
    k.add_argument("--every", type=float, required=True, metavar="SECONDS", help="how often to check")
    k.add_argument("--min-tokens", type=int, required=True, metavar="N", help="pending tokens (after HEAD's cursor) that start a cycle")
    _cycle_flags(k)
    _common(k)
    k.set_defaults(func=cmd_add, cron=None)
    k = add_parser(kinds, "cycle", "run a cycle on a stream on an interval or a crontab",
                   'lifelong --store ./store schedule add cycle news --cron "0 3 * * *"')
    k.add_argument("stream")
    _when(k)
    _cycle_flags(k)
    _common(k)
    k.set_defaults(func=cmd_add)
    k = add_parser(kinds, "audit", "audit HEAD's retrieval once per new version, checked on an interval or crontab",
                   "lifelong --store ./store schedule add audit --every 600")
    _when(k)
    k.add_argument("--queries", type=int, default=2048, metavar="N", help="query tokens per layer (default %(default)s)")
    k.add_argument("--min-recall", type=float, default=DEFAULT_MIN_RECALL, metavar="R",
                   help="log an error below this recall (up to float ties; default %(default)s)")
    _common(k)
    k.set_defaults(func=cmd_add)

    p = add_parser(verbs, "list", "scheduled jobs with their trigger and next run", "lifelong --store ./store schedule list --json")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_list)

    p = add_parser(verbs, "remove", "remove a scheduled job", "lifelong --store ./store schedule remove poll:news")
    p.add_argument("id", help="job id (see `schedule list`)")
    p.set_defaults(func=cmd_remove)

    p = add_parser(verbs, "status", "jobs, lease holders and the last cycles", "lifelong --store ./store schedule status --last 10")
    p.add_argument("--last", type=int, default=5, metavar="N", help="cycles to show (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_status)

    p = add_parser(verbs, "run", "run the scheduler in the foreground until SIGTERM/Ctrl-C (or each due job once)",
                   "lifelong --store ./store schedule run --once")
    p.add_argument("--once", action="store_true", help="run each poll job and each due cycle/audit job one time, then exit")
    p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS", help="wait this long for another scheduler to stop")
    p.add_argument("--verbose", "-v", action="store_true", help="also log APScheduler's own messages")
    p.add_argument("--json", action="store_true", help="with --once: print the job results as JSON")
    p.set_defaults(func=cmd_run)
