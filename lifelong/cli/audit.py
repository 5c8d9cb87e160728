"""`lifelong audit`: FAISS exact top-k vs product-key retrieval for a stored version."""

from __future__ import annotations

import argparse
import os
import sys

from ..audit_report import DEFAULT_MIN_RECALL
from ..audit_version import audit_version
from ..errors import LifelongError
from ..monitor import Monitor
from ..workspace import open_registry, tensorboard_dir
from .common import CLIError, add_parser, open_store, print_json


def _launch(args: argparse.Namespace) -> int:
    """``--nproc N``: become ``torchrun`` running this command on N local processes."""
    from ..distributed import relaunch

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise CLIError("--nproc given inside a torchrun launch", hint="use either --nproc N or torchrun, not both")
    return relaunch(getattr(args, "argv", None) or sys.argv[1:], args.nproc)


def cmd_audit(args: argparse.Namespace) -> int:
    from ..distributed import RankError, init_from_env, shutdown

    if args.nproc is not None and args.nproc > 1:
        return _launch(args)
    dist = init_from_env(args.device)
    try:
        code = _cmd_audit(args, dist)
        if dist is not None:
            dist.barrier()  # leave together: a rank tearing gloo down while rank 0 still reports aborts
        return code
    except RankError:  # rank 0 failed and said why
        return 1
    except LifelongError:
        if dist is not None and not dist.is_main:
            return 1  # every rank hit the same error: rank 0 says it
        raise
    finally:
        shutdown()


def _cmd_audit(args: argparse.Namespace, dist) -> int:  # noqa: ANN001
    main = dist is None or dist.is_main
    store = open_store(args, read_only=not main)
    registry = open_registry(store)
    monitor = Monitor(tensorboard_dir(store)) if main else None
    try:
        report = audit_version(
            store, registry, args.version, streams=args.streams or None, max_queries=args.queries,
            device=args.device, chunk_rows=args.chunk_rows, progress=main and not args.no_progress, monitor=monitor,
            dist=dist,
        )
    finally:
        if monitor is not None:
            monitor.close()
    if not main:
        return 0
    passed = report.passed(args.min_recall)
    if args.json:
        print_json({**report.to_dict(), "passed": passed, "min_recall_threshold": args.min_recall})
    else:
        print(report.format_table(per_head=not args.totals, threshold=args.min_recall))
        verdict = "PASS" if passed else "FAIL"
        print(f"{verdict}: recall@k up to float ties {report.min_recall:.6f} (threshold {args.min_recall}); "
              f"raw recall {report.total.recall:.6f} over {report.total.queries} queries in {report.seconds:.1f}s")
    return 0 if passed else 1


def _nproc(text: str) -> int:
    from .cycles import _nproc as parse

    return parse(text)


def register(sub: argparse._SubParsersAction) -> None:
    p = add_parser(sub, "audit", "check that product-key retrieval returns the exact top-k (FAISS IndexFlatIP)",
                   "lifelong --store ./store audit HEAD --queries 4096 --json")
    p.add_argument("version", nargs="?", default="HEAD", help="id, tag, ref or HEAD~n (default HEAD)")
    p.add_argument("--streams", nargs="*", help="streams whose held-out text is used (default: all the version trained on)")
    p.add_argument("--queries", type=int, default=2048, help="query tokens per layer (each gives one query per head)")
    p.add_argument("--min-recall", type=float, default=DEFAULT_MIN_RECALL,
                   help="exit 1 below this recall (up to float ties; default %(default)s)")
    p.add_argument("--chunk-rows", type=int, help="grid rows per FAISS index chunk (bounds memory)")
    p.add_argument("--device", help="device for the model (default: GPU if there is one)")
    p.add_argument("--totals", action="store_true", help="one line per layer, no per-head rows")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--nproc", type=_nproc, metavar="N",
                   help="split the audit's queries across N local processes (torchrun); rank 0 prints and records")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_audit)
