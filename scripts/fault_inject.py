"""Exhaustive I/O fault injection: every filesystem and database write of each operation
fails in turn, once with ENOSPC and once with EIO (the harness is ``tests/faultlib.py``,
the operations ``tests/faultops.py``).

For each operation — a store's first commit, an incremental commit (delta, reused and new
shards), ``lifelong ingest`` (staging), a cycle's commit with its cursor move, ``lifelong
gc``, ``lifelong rollback``, ``lifelong tag``, ``lifelong init`` — point N = 1, 2, … fails until a run
completes with no failure left to inject. After each failure: the store is at the state
before or after, ``verify`` is clean and HEAD loads, the user got one line in their words
(exit 1, no traceback), the retry succeeds, and ``gc --grace 0`` leaves nothing behind.

    python scripts/fault_inject.py                        # everything (~1 h on 2 busy cores)
    python scripts/fault_inject.py --ops gc,tag --errnos EIO -v
    python scripts/fault_inject.py --points               # list every injection point
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

# Run from a checkout: the repo's packages first, then the tests' harness.
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "tests"))

import faultlib  # noqa: E402
import faultops  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", default=",".join(faultops.OPERATIONS),
                        help=f"comma-separated, of: {', '.join(faultops.OPERATIONS)}")
    parser.add_argument("--errnos", default="ENOSPC,EIO", help="comma-separated, of: ENOSPC, EIO")
    parser.add_argument("--points", action="store_true", help="list every injection point of each operation")
    parser.add_argument("-v", "--verbose", action="store_true", help="one line per injected failure")
    parser.add_argument("--json", action="store_true", help="print the reports as JSON")
    args = parser.parse_args(argv)
    ops = [o for o in args.ops.split(",") if o]
    unknown = [o for o in ops if o not in faultops.OPERATIONS]
    if unknown:
        parser.error(f"unknown operation(s): {', '.join(unknown)}")
    log = (lambda line: print(f"  {line}", file=sys.stderr, flush=True)) if args.verbose else None
    reports = []
    for name in ops:
        for errno_name in args.errnos.split(","):
            report = faultlib.sweep(faultops.OPERATIONS[name](), faultlib.ERRNOS[errno_name], log=log)
            reports.append(report)
            if not args.json:
                kinds = ", ".join(f"{k} {n}" for k, n in sorted(report.kinds.items()))
                print(f"{report.operation:<20} {report.errno:<7} {report.points:>4} points ({kinds}); "
                      f"{report.injected} failures injected, {report.tolerated} absorbed, "
                      f"{len(report.failures)} problems, {report.seconds:.1f} s", flush=True)
                for line in report.failures:
                    print(f"    {line}")
                if args.points and errno_name == args.errnos.split(",")[0]:
                    for line in report.where:
                        print(f"    {line}")
    if args.json:
        print(json.dumps([asdict(r) | {"ok": r.ok} for r in reports], indent=2))
    else:
        total = sum(len(r.failures) for r in reports)
        points = sum(r.points for r in reports)
        print(f"total: {points} injection points over {len(reports)} sweeps, {total} problems")
    return 0 if all(r.ok for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
