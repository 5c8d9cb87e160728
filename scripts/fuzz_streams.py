"""Fuzz the stream readers: hostile files through the real ingest path.

Every source format (text in each mode, JSONL, JSON, CSV, Parquet) as a file, a drop
folder and a glob, with random and truncated bytes, invalid UTF-8, NUL bytes, huge lines,
deep JSON, other encodings, CSV rows with the wrong columns and broken Parquet: each
ingest must give a clean, consistent result or exactly one ``StreamError`` naming the
file (and line), with the cursor and the staged data unchanged (the property of
``tests/streams/fuzz_testlib.py``, which ``tests/streams/test_fuzz.py`` runs on a few
hundred cases). Failures are counted, not shrunk; ``--stop`` stops at the first one and
lets hypothesis shrink it.

    python scripts/fuzz_streams.py                       # 500 cases
    python scripts/fuzz_streams.py --long --examples     # 10,000 (the figure in docs/streams.md)
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # a checkout's packages over a stale install
sys.path.insert(0, str(ROOT / "tests" / "streams"))  # fuzz_testlib, stream_testlib
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--long", action="store_true", help="10,000 cases (default: 500)")
    parser.add_argument("--cases", type=int, help="number of cases (overrides --long)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stop", action="store_true", help="stop and shrink at the first failure")
    parser.add_argument("--examples", action="store_true", help="print a message of each error class seen")
    args = parser.parse_args(argv)
    n = args.cases or (10_000 if args.long else 500)

    from hypothesis import HealthCheck, given, seed, settings
    from sqlalchemy import create_engine

    import datasets

    from fuzz_testlib import EXAMPLES, cases, fuzz_one
    from streams import StreamRegistry

    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # it logs every file it cannot read
    outcomes: collections.Counter[str] = collections.Counter()
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="fuzz-streams-") as tmp:
        engine = create_engine(f"sqlite:///{tmp}/store.db")
        reg = StreamRegistry(engine, work_dir=tmp)

        @seed(args.seed)
        @settings(max_examples=n, deadline=None, database=None, print_blob=True,
                  suppress_health_check=list(HealthCheck))
        @given(cases())
        def fuzz(case):
            try:
                outcomes[fuzz_one(reg, tmp, case)] += 1
            except Exception as exc:  # noqa: BLE001 - count it, go on
                outcomes["FAILED"] += 1
                where = traceback.extract_tb(exc.__traceback__)[-1]
                failures.append(f"{type(exc).__name__}: {exc} (at {Path(where.filename).name}:"
                                f"{where.lineno}: {where.line})\n    case: {case!r}"[:3000])
                if args.stop:
                    raise

        t0 = time.perf_counter()
        try:
            fuzz()
        finally:
            seconds = time.perf_counter() - t0
            engine.dispose()
            total = sum(outcomes.values())
            for f in failures[:20]:
                print(f"FAILURE: {f}", file=sys.stderr)
            print(f"cases run: {total:,}; failures found: {len(failures)}; {seconds:.0f} s "
                  f"({total / max(seconds, 1e-9):.1f} cases/s)")
            print("outcomes: " + ", ".join(f"{k}={v}" for k, v in outcomes.most_common()))
            for name, message in sorted(EXAMPLES.items()) if args.examples else ():
                print(f"  {name}: {message[:200]}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
