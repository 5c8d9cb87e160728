"""Crash-safety check of the expert store: SIGKILL a committing process at random moments.

Each trial starts a worker process that commits versions in a loop (new shards of a few
MB, reused frozen shards, a sparse update of each layer's first shard as a delta shard —
compacted into a full shard every ``MAX_DELTA_CHAIN + 1`` commits — and dense weights),
kills it with SIGKILL after a random delay, and then checks the store: ``verify()`` finds
no problem, HEAD names a complete version whose objects all load (delta chains applied),
and the next commit succeeds. Workers are forked from a forkserver that
has already imported torch, so a trial costs the kill delay, not an interpreter start.

    python scripts/crash_store.py --trials 300
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

# Run from a checkout: prefer the repo's packages over a stale editable install.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from expert_store import DeltaShard, ExistingShard, ExpertStore, NewShard, ShardInfo

LAYERS = ("blocks.0.peer", "blocks.1.peer")
KEEP_SHARDS = 4  # per layer; older shards drop out so versions stay small over many trials


def sparse_update(store: ExpertStore, shard: ShardInfo, gen: torch.Generator) -> DeltaShard:
    """A delta changing 1/8 of the rows of ``u`` and of ``row_keys`` of a stored shard."""
    spec = store.objects.header(store.shard_chain(shard)[0].object_hash)  # (dtype, shape) by name
    rows = {}
    for name in ("u", "row_keys"):
        dtype, shape = spec[name]
        ids = torch.randperm(shape[0], generator=gen)[: max(1, shape[0] // 8)]  # (R,)
        rows[name] = (ids, torch.randn((len(ids), *shape[1:]), generator=gen, dtype=dtype))  # (R, ...)
    return DeltaShard(shard.id, rows)


def make_commit(store: ExpertStore, step: int, rows: int, d: int, who: str) -> int:
    """Commit one growth step on top of HEAD: a sparse update (delta) of each layer's first
    shard, freeze its newest shards, add one new shard per layer."""
    head = store.head()
    previous = store.version(head).shards if head is not None else []
    gen = torch.Generator().manual_seed(step)
    shards: list[NewShard | ExistingShard | DeltaShard] = []
    for layer in LAYERS:
        mine = [s for s in previous if s.layer == layer]
        if mine:
            shards.append(sparse_update(store, mine[0], gen))
        kept = mine[1:][-(KEEP_SHARDS - 2):]
        shards += [ExistingShard(s.id) for s in kept]
        start = max((s.row_end for s in previous if s.layer == layer), default=0)
        tensors = {
            "row_keys": torch.randn(rows, 16, generator=gen),  # (rows, d_key/2)
            "u": torch.randn(rows * 8, d, generator=gen),  # (rows*n2, d_model)
            "v": torch.randn(rows * 8, d, generator=gen),
        }
        shards.append(NewShard(layer, start, start + rows, rows * 8, tensors, frozen=False))
    dense = {"embed": torch.randn(256, d, generator=gen), "step": torch.tensor(step)}
    version = store.commit(
        shards=shards, dense=dense, message=f"step {step}", parent=head,
        metrics={"step": step}, cursors={"s": {"offset": step}}, who=who, created_by=f"cycle-{step}",
    )
    return version.id


def worker(path: str, seed: int, rows: int, d: int, ready: mp.synchronize.Event) -> None:
    """Commit forever (until killed)."""
    store = ExpertStore.open(path)
    ready.set()
    step = seed * 100_000
    while True:
        step += 1
        make_commit(store, step, rows, d, who=f"worker-{seed}")


def race_worker(path: str, parent: int | None, seed: int, barrier: mp.synchronize.Barrier, results: mp.Queue) -> None:
    """Commit once on ``parent`` after all racers reach ``barrier``; report the outcome."""
    from expert_store import ConflictError

    store = ExpertStore.open(path)
    gen = torch.Generator().manual_seed(seed)
    tensors = {"u": torch.randn(4096, 64, generator=gen), "v": torch.randn(4096, 64, generator=gen)}
    barrier.wait()
    try:
        version = store.commit(
            shards=[NewShard(LAYERS[0], 1000 + seed, 1001 + seed, 4096, tensors)],
            dense={"w": torch.randn(64, generator=gen)}, message=f"racer {seed}", parent=parent,
            who=f"racer-{seed}",
        )
        results.put(("ok", version.id))
    except ConflictError as exc:
        results.put(("conflict", str(exc)))
    except Exception as exc:  # noqa: BLE001 - the test reports anything else as a failure
        results.put(("error", f"{type(exc).__name__}: {exc}"))


def race(path: str, parent: int | None, n: int = 2, seed: int = 0) -> list[tuple[str, object]]:
    """Start ``n`` processes that commit on the same ``parent`` at the same moment."""
    ctx = forkserver()
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=race_worker, args=(path, parent, seed + i, barrier, results)) for i in range(n)]
    for proc in procs:
        proc.start()
    outcomes = [results.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join()
    return outcomes


def forkserver() -> mp.context.BaseContext:
    """A forkserver context whose server has torch and expert_store imported already."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "expert_store"])
    return ctx


@dataclass
class Summary:
    trials: int = 0
    failures: list[str] = field(default_factory=list)
    versions_committed: int = 0
    kills_leaving_temp_files: int = 0
    kills_leaving_unreachable_objects: int = 0
    delta_shards: int = 0  # shard rows committed as deltas
    compactions: int = 0  # deltas written in full because their chain was at its limit
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failures


def check_after_kill(store: ExpertStore, trial: int) -> tuple[bool, bool]:
    """Raise AssertionError unless the store is consistent and usable; report leftovers."""
    problems = store.verify()
    assert not problems, f"trial {trial}: verify found {[str(p) for p in problems]}"
    head = store.head()
    if head is not None:
        version = store.version(head)
        for shard in version.shards:
            store.load_shard(shard)
        store.load_dense(head)
    leftovers = store.gc(dry_run=True, grace_s=0)
    make_commit(store, 10**9 + trial, rows=2, d=8, who="checker")
    assert store.head() != head, f"trial {trial}: commit after kill did not move HEAD"
    removed = store.gc(grace_s=0)
    assert not store.verify(), f"trial {trial}: verify failed after gc"
    assert not list(store.objects.temp_files()), f"trial {trial}: gc left temp files"
    return bool(removed.temp_files or leftovers.temp_files), bool(leftovers.objects)


def count_shards(store: ExpertStore, summary: Summary) -> None:
    """Add a finished store's versions, delta shards and compactions to ``summary``."""
    versions = store.versions()
    shards = {s.id: s for v in versions for s in v.shards}
    summary.versions_committed += len(versions)
    summary.delta_shards += sum(s.base_id is not None for s in shards.values())
    firsts = {(s.layer, s.id) for s in shards.values() if s.row_start == 0 and s.base_id is None}
    summary.compactions += len(firsts) - len({layer for layer, _ in firsts})


def run(
    trials: int, rows: int = 16, d: int = 256, max_delay: float = 0.4, seed: int = 0, per_store: int = 25,
    progress: Callable[[str], None] | None = None,
) -> Summary:
    """Run ``trials`` kill-and-check rounds, on a fresh store every ``per_store`` trials.

    (``verify`` re-hashes every object after each kill, so one ever-growing store would
    make the run quadratic.) ``progress`` gets a line after each store's trials.
    """
    rng = random.Random(seed)
    ctx = forkserver()
    summary = Summary()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="crash-store-") as tmp:
        store: ExpertStore | None = None
        for trial in range(trials):
            if trial % per_store == 0:
                if store is not None:
                    count_shards(store, summary)
                    store.close()
                    if progress is not None:
                        progress(f"{summary.trials} trials, {len(summary.failures)} failures, "
                                 f"{time.perf_counter() - start:.0f} s")
                root = Path(tmp) / f"store-{trial // per_store}"
                ExpertStore.init(root, {"purpose": "crash test"}).close()
                store = ExpertStore.open(root)
            ready = ctx.Event()
            proc = ctx.Process(target=worker, args=(str(root), trial, rows, d, ready), daemon=True)
            proc.start()
            if not ready.wait(60):
                proc.kill()
                summary.failures.append(f"trial {trial}: worker did not start")
                continue
            time.sleep(rng.uniform(0.0, max_delay))
            proc.kill()  # SIGKILL
            proc.join()
            summary.trials += 1
            try:
                temp, unreachable = check_after_kill(store, trial)
                summary.kills_leaving_temp_files += temp
                summary.kills_leaving_unreachable_objects += unreachable
            except Exception as exc:  # noqa: BLE001 - every failure is reported, not raised
                summary.failures.append(f"trial {trial}: {type(exc).__name__}: {exc}")
        if store is not None:
            count_shards(store, summary)
            store.close()
    summary.seconds = time.perf_counter() - start
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--rows", type=int, default=16, help="rows per new shard (x8 experts)")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--max-delay", type=float, default=0.4, help="seconds; kill after uniform(0, this)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-store", type=int, default=25, help="trials per fresh store")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--progress", action="store_true", help="a line on stderr after each store's trials")
    args = parser.parse_args(argv)
    report = (lambda line: print(line, file=sys.stderr, flush=True)) if args.progress else None
    summary = run(args.trials, args.rows, args.d_model, args.max_delay, args.seed, args.per_store, report)
    if args.json:
        print(json.dumps(asdict(summary) | {"ok": summary.ok}, indent=2))
    else:
        print(f"trials:                      {summary.trials}")
        print(f"versions committed:          {summary.versions_committed}")
        print(f"kills leaving temp files:    {summary.kills_leaving_temp_files}")
        print(f"kills leaving unreachable:   {summary.kills_leaving_unreachable_objects}")
        print(f"delta shards committed:      {summary.delta_shards}")
        print(f"chains compacted:            {summary.compactions}")
        print(f"failures:                    {len(summary.failures)}")
        for line in summary.failures:
            print(f"  {line}")
        print(f"time:                        {summary.seconds:.1f} s")
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main())
