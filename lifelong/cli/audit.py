"""`lifelong audit`: FAISS exact top-k vs product-key retrieval for a stored version."""

from __future__ import annotations

import argparse

from ..audit_report import DEFAULT_MIN_RECALL
from ..audit_version import audit_version
from ..monitor import Monitor
from ..workspace import open_registry, tensorboard_dir
from .common import add_parser, open_store, print_json


def cmd_audit(args: argparse.Namespace) -> int:
    store = open_store(args)
    registry = open_registry(store)
    monitor = Monitor(tensorboard_dir(store))
    try:
        report = audit_version(
            store, registry, args.version, streams=args.streams or None, max_queries=args.queries,
            device=args.device, chunk_rows=args.chunk_rows, progress=not args.no_progress, monitor=monitor,
        )
    finally:
        monitor.close()
    passed = report.passed(args.min_recall)
    if args.json:
        print_json({**report.to_dict(), "passed": passed, "min_recall_threshold": args.min_recall})
    else:
        print(report.format_table(per_head=not args.totals, threshold=args.min_recall))
        verdict = "PASS" if passed else "FAIL"
        print(f"{verdict}: recall@k up to float ties {report.min_recall:.6f} (threshold {args.min_recall}); "
              f"raw recall {report.total.recall:.6f} over {report.total.queries} queries in {report.seconds:.1f}s")
    return 0 if passed else 1


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
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_audit)
