"""Latency of a tiny expert store on SQLite and on PostgreSQL: what the database costs.

The store is tiny on purpose (2 layers, each commit adds one shard of 4 rows x 8 experts x
d 64 per layer and reuses every earlier shard), so the figures are dominated by the
database round trips and the object writes, not by tensor bytes. Per backend:

- ``open``:     ``ExpertStore.open`` (marker, reachability, schema check)
- ``commit``:   one commit on HEAD (objects, shard/version rows, ref compare-and-swap)
- ``checkout cold``: every shard of a version into a fresh ``Residency`` (verified)
- ``checkout step``: HEAD~1 -> HEAD with the rest resident (loads the new shards only)
- ``rollback``: a HEAD move (compare-and-swap + reflog row)
- ``lease``:    take and release the ``cycle`` lease (``lifelong.records.Lease``)

On PostgreSQL the store lives in a fresh schema that is dropped afterwards.

    python scripts/bench_backends.py                        # SQLite and $LIFELONG_TEST_PG_URL
    python scripts/bench_backends.py --commits 100 --json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

# Run from a checkout: prefer the repo's packages over a stale editable install.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from expert_store import ExistingShard, ExpertStore, NewShard, Residency  # noqa: E402
from lifelong.records import Lease  # noqa: E402

DEFAULT_PG_URL = os.environ.get("LIFELONG_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
LAYERS = ("blocks.0.peer", "blocks.1.peer")
ROWS, N2, D = 4, 8, 64


@contextmanager
def pg_schema(base_url: str) -> Iterator[str]:
    """A fresh schema on the server; yields a URL whose connections use it; dropped after."""
    import psycopg
    from sqlalchemy import make_url

    conninfo = make_url(base_url).set(drivername="postgresql").render_as_string(hide_password=False)
    name = f"bench_{int(time.time())}_{secrets.token_hex(4)}"
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{name}"')
    try:
        yield make_url(base_url).update_query_dict({"options": f"-csearch_path={name}"}).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{name}" CASCADE')


def timed(fn: Callable[[], object], repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e3)
    return out


def summary(ms: list[float]) -> dict[str, float]:
    ms = sorted(ms)
    return {"median_ms": statistics.median(ms), "p90_ms": ms[int(0.9 * (len(ms) - 1))], "n": len(ms)}


def commit_one(store: ExpertStore, step: int) -> None:
    head = store.head()
    previous = store.version(head).shards if head is not None else []
    gen = torch.Generator().manual_seed(step)
    shards: list[NewShard | ExistingShard] = [ExistingShard(s.id) for s in previous]
    for layer in LAYERS:
        start = max((s.row_end for s in previous if s.layer == layer), default=0)
        tensors = {"row_keys": torch.randn(ROWS, 16, generator=gen),  # (rows, d_key/2)
                   "u": torch.randn(ROWS * N2, D, generator=gen), "v": torch.randn(ROWS * N2, D, generator=gen)}
        shards.append(NewShard(layer, start, start + ROWS, ROWS * N2, tensors))
    store.commit(shards=shards, dense={"embed": torch.randn(64, D, generator=gen)}, message=f"step {step}",
                 parent=head, metrics={"step": step}, cursors={"s": {"offset": step}})


def bench(name: str, url: str | None, commits: int, repeats: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
        path = Path(tmp) / "store"
        ExpertStore.init(path, {"bench": True}, url=url).close()
        res: dict[str, object] = {"backend": name, "open": summary(timed(lambda: ExpertStore.open(path, url=url).close(), repeats))}
        store = ExpertStore.open(path, url=url)
        step = iter(range(10**6))
        res["commit"] = summary(timed(lambda: commit_one(store, next(step)), commits))
        head = store.head()
        res["checkout cold"] = summary(timed(lambda: Residency(store).checkout(head), repeats))
        residency = Residency(store)
        residency.checkout("HEAD~1")

        def step_forward() -> None:
            residency.checkout(head)
            residency.checkout("HEAD~1")  # back, untimed below: halve

        res["checkout step"] = summary([t / 2 for t in timed(step_forward, repeats)])
        res["rollback"] = summary([t / 2 for t in timed(lambda: (store.rollback("HEAD~1"), store.rollback(head)), repeats)])
        lease = Lease(store.engine, "cycle", holder="bench")
        res["lease"] = summary(timed(lambda: (lease.acquire(), lease.release()), repeats))
        assert store.verify() == [] and store.head() == head
        res["versions"] = len(store.versions())
        res["shards at HEAD"] = len(store.version(head).shards)
        store.close()
        return res


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pg-url", default=DEFAULT_PG_URL, help="PostgreSQL server (a schema is created and dropped)")
    parser.add_argument("--no-postgresql", action="store_true")
    parser.add_argument("--commits", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = [bench("sqlite", None, args.commits, args.repeats)]
    if not args.no_postgresql:
        with pg_schema(args.pg_url) as url:
            results.append(bench("postgresql", url, args.commits, args.repeats))
    machine = {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
               "load_average_1m": os.getloadavg()[0]}
    if args.json:
        print(json.dumps({"machine": machine, "results": results}, indent=2))
        return 0
    print(f"{machine['machine']}, {machine['cpus']} CPUs, load average {machine['load_average_1m']:.1f}; "
          f"{args.commits} commits, {args.repeats} repeats; median (p90) ms")
    ops = [k for k, v in results[0].items() if isinstance(v, dict)]
    print(f"{'':16}" + "".join(f"{r['backend']:>20}" for r in results))
    for op in ops:
        print(f"{op:16}" + "".join(f"{r[op]['median_ms']:>11.1f} ({r[op]['p90_ms']:6.1f})" for r in results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
