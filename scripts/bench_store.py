"""Benchmark of the expert store on one PEER layer at paper scale (1024 x 1024 experts).

Measures (a) the first commit (one shard of all rows + ~10 MB of dense weights),
(b) a commit after growing the layer by 1/16 more rows (new shard + dense only; the
frozen shard is reused through ExistingShard), (c) rollback (a HEAD move), and
(d) Residency checkout between the two versions (loads only the differing shard).

``--delta`` measures the commit of a sparse cycle instead: ``--fraction`` of the experts'
``u`` and ``v`` rows and as many row keys changed, committed as the whole shard rewritten
(a NewShard) and as a DeltaShard on the stored shard; each commit carries fresh dense
weights. ``--repeats`` interleaved repeats (a fresh store each), medians reported; then
checkout of the delta version, cold and with its base resident, checked bit-identical
against the tensors in memory.

    python scripts/bench_store.py               # full size: 2 GiB of experts
    python scripts/bench_store.py --rows 64     # quick run
    python scripts/bench_store.py --delta       # delta shard vs full shard at full size
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

# Run from a checkout: prefer the repo's packages over a stale editable install.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from expert_store import DeltaShard, ExistingShard, ExpertStore, NewShard, Residency  # noqa: E402
from expert_store.residency import format_bytes  # noqa: E402

LAYER = "blocks.0.peer"


def shard_tensors(rows: int, n2: int, d_model: int, d_key: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "row_keys": torch.randn(rows, d_key // 2, generator=gen),  # (rows, d_key/2)
        "u": torch.randn(rows * n2, d_model, generator=gen),  # (rows*n2, d_model)
        "v": torch.randn(rows * n2, d_model, generator=gen),  # (rows*n2, d_model)
    }


def dense_tensors(d_model: int, dense_mb: float, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    vocab = max(1, int(dense_mb * 2**20 / 4 / d_model / 2))
    return {
        "embed.weight": torch.randn(vocab, d_model, generator=gen),  # (vocab, d)
        "head.weight": torch.randn(vocab, d_model, generator=gen),
        "query.weight": torch.randn(128, d_model, generator=gen),
    }


def disk_bytes(store: ExpertStore) -> tuple[int, int]:
    """(bytes of object files, bytes of the database files)."""
    objects = sum(store.objects.path(h).stat().st_size for h in store.objects.hashes())
    db = sum(p.stat().st_size for p in store.path.glob("store.db*"))
    return objects, db


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def run(rows: int, grow: int, n2: int, d_model: int, d_key: int, dense_mb: float, root: Path) -> dict[str, float]:
    store = ExpertStore.init(root / "store", {"n2": n2, "d_model": d_model, "d_key": d_key})
    out: dict[str, float] = {"rows": rows, "grow_rows": grow, "n2": n2, "d_model": d_model}
    first = shard_tensors(rows, n2, d_model, d_key, seed=0)
    out["experts_first"] = rows * n2

    # (a) first commit
    v1, out["a_first_commit_s"] = timed(lambda: store.commit(
        shards=[NewShard(LAYER, 0, rows, rows * n2, first, frozen=True)],
        dense=dense_tensors(d_model, dense_mb, 0), message="initial", parent=None, created_by="cycle-1",
    ))
    objects_a, db_a = disk_bytes(store)
    out["a_bytes_written"] = objects_a + db_a

    # (b) grow by `grow` rows: new shard + dense; the frozen shard is reused
    new = shard_tensors(grow, n2, d_model, d_key, seed=1)
    v2, out["b_grow_commit_s"] = timed(lambda: store.commit(
        shards=[ExistingShard(v1.shards[0].id), NewShard(LAYER, rows, rows + grow, grow * n2, new)],
        dense=dense_tensors(d_model, dense_mb, 1), message=f"grow {grow} rows", parent=v1.id, created_by="cycle-2",
    ))
    objects_b, db_b = disk_bytes(store)
    out["b_bytes_written"] = (objects_b - objects_a) + (db_b - db_a)
    out["b_over_a"] = out["b_bytes_written"] / out["a_bytes_written"]

    # (c) rollback and roll forward: HEAD moves
    moves = []
    for i in range(10):
        _, seconds = timed(lambda: store.rollback(v1.id if i % 2 == 0 else v2.id, why="bench"))
        moves.append(seconds)
    out["c_rollback_ms_median"] = statistics.median(moves) * 1e3
    out["c_rollback_ms_max"] = max(moves) * 1e3

    # (d) residency: v1 (cold), then v2 (loads only the new shard), then back to v1
    residency = Residency(store, "cpu")
    cold = residency.checkout(v1.id)
    out["d_cold_checkout_s"] = cold.seconds
    warm = residency.checkout(v2.id)
    assert warm.loaded == [v2.shards[1].id] and warm.reused == [v1.shards[0].id], (warm.loaded, warm.reused)
    out["d_checkout_v1_to_v2_s"] = warm.seconds
    out["d_bytes_loaded_v1_to_v2"] = warm.bytes_loaded
    out["d_shards_loaded"] = len(warm.loaded)
    out["d_shards_reused"] = len(warm.reused)
    back = residency.checkout(v1.id)
    out["d_checkout_v2_to_v1_s"] = back.seconds
    out["resident_bytes"] = residency.resident_bytes()

    _, out["verify_s"] = timed(store.verify)
    store.close()
    return out


def sparse_rows(full: dict[str, torch.Tensor], fraction: float, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``fraction`` of the experts' u and v rows and of the row keys, replaced by new values."""
    gen = torch.Generator().manual_seed(seed)
    n_experts, n_rows = full["u"].shape[0], full["row_keys"].shape[0]
    experts = torch.randperm(n_experts, generator=gen)[: max(1, round(fraction * n_experts))]  # (R,)
    keys = torch.randperm(n_rows, generator=gen)[: max(1, round(fraction * n_rows))]  # (K,)
    return {
        "u": (experts, torch.randn(len(experts), full["u"].shape[1], generator=gen)),  # (R, d)
        "v": (experts, torch.randn(len(experts), full["v"].shape[1], generator=gen)),  # (R, d)
        "row_keys": (keys, torch.randn(len(keys), full["row_keys"].shape[1], generator=gen)),  # (K, dk/2)
    }


def run_delta(rows: int, n2: int, d_model: int, d_key: int, dense_mb: float, fraction: float, repeats: int,
              root: Path) -> dict[str, float]:
    """A sparse cycle's commit: the changed shard rewritten in full vs as a delta shard.

    Each repeat commits a base version (untimed) into a fresh store, changes ``fraction``
    of the rows, then commits the result both ways — full then delta, or delta then full
    on odd repeats — each after ``os.sync()`` so that neither pays for the other's
    write-back. Then checks out the last delta version.
    """
    full = shard_tensors(rows, n2, d_model, d_key, seed=0)
    out: dict[str, float] = {"rows": rows, "n2": n2, "d_model": d_model, "fraction": fraction, "repeats": repeats,
                             "experts": rows * n2}
    samples: dict[str, list[float]] = {k: [] for k in ("full_s", "delta_s", "full_bytes", "delta_bytes")}
    for r in range(repeats):
        path = root / f"store-{r}"
        store = ExpertStore.init(path, {"n2": n2, "d_model": d_model, "d_key": d_key})
        base = store.commit(shards=[NewShard(LAYER, 0, rows, rows * n2, full)], dense=dense_tensors(d_model, dense_mb, 3 * r),
                            message="base", parent=None).shards[0]
        delta = sparse_rows(full, fraction, seed=r + 1)
        out["delta_expert_rows"], out["delta_row_keys"] = len(delta["u"][0]), len(delta["row_keys"][0])
        for name, (ids, values) in delta.items():
            full[name][ids] = values  # (what a training step would leave in the table)
        shards = {"full": NewShard(LAYER, 0, rows, rows * n2, full), "delta": DeltaShard(base.id, delta)}
        for kind in ("full", "delta") if r % 2 == 0 else ("delta", "full"):
            os.sync()
            before = sum(disk_bytes(store))
            dense = dense_tensors(d_model, dense_mb, 3 * r + 1 + (kind == "delta"))
            version, seconds = timed(store.commit, shards=[shards[kind]], dense=dense,
                                     message=f"sparse cycle, {kind}", parent=store.head())
            samples[f"{kind}_s"].append(seconds)
            samples[f"{kind}_bytes"].append(sum(disk_bytes(store)) - before)
            out[f"{kind}_object_bytes"] = store.objects.path(version.shards[0].object_hash).stat().st_size
            out[f"{kind}_version"] = version.id
        store.close()
        if r < repeats - 1:
            shutil.rmtree(path)
    for key, values in samples.items():
        out[key] = statistics.median(values)
        out[key + "_all"] = values  # type: ignore[assignment]
    out["dense_bytes"] = out["delta_bytes"] - out["delta_object_bytes"]
    out["object_ratio"] = out["delta_object_bytes"] / out["full_object_bytes"]
    out["bytes_ratio"] = out["delta_bytes"] / out["full_bytes"]
    out["time_ratio"] = out["delta_s"] / out["full_s"]

    # Checkout of the delta version: cold (base + delta read and re-hashed; also what a CPU
    # residency does with the base resident), then with the base resident and copied
    # (reuse_bases=True, the default off the CPU). Both bit-identical to the tensors in memory.
    def same(tensors: dict[str, torch.Tensor]) -> bool:
        return all(torch.equal(tensors[k].view(torch.int32), full[k].view(torch.int32)) for k in full)

    store = ExpertStore.open(root / f"store-{repeats - 1}")
    v1, v2 = store.version(1), store.version(int(out["delta_version"]))
    cold = Residency(store, "cpu").checkout(v2.id)
    out["checkout_cold_s"] = cold.seconds
    identical = same(cold.layers[LAYER][0][1])
    del cold
    gc.collect()
    residency = Residency(store, "cpu", reuse_bases=True)
    residency.checkout(v1.id)
    warm = residency.checkout(v2.id)
    out["checkout_base_copied_s"] = warm.seconds
    out["bit_identical"] = identical and same(warm.layers[LAYER][0][1])
    del warm
    residency.evict()
    store.close()
    return out


def print_delta(out: dict[str, float]) -> None:
    mib = 2**20
    print(f"PEER layer: {out['rows']} x {out['n2']} = {out['experts']:,} experts, d_model {out['d_model']}, float32")
    print(f"sparse update: {out['delta_expert_rows']:,} experts' u and v rows ({100 * out['fraction']:g}%) "
          f"+ {out['delta_row_keys']} row keys, committed (with fresh dense weights) as:")
    print(f"shard rewritten     {out['full_s']:8.2f} s   {out['full_bytes'] / mib:8.1f} MiB written "
          f"(shard object {out['full_object_bytes'] / mib:.1f} MiB)")
    print(f"delta shard         {out['delta_s']:8.2f} s   {out['delta_bytes'] / mib:8.1f} MiB written "
          f"(delta object {out['delta_object_bytes'] / mib:.1f} MiB, dense + db {out['dense_bytes'] / mib:.1f} MiB)")
    print(f"delta / rewritten   {100 * out['time_ratio']:7.2f}% time, {100 * out['bytes_ratio']:.2f}% bytes written, "
          f"{100 * out['object_ratio']:.2f}% shard object bytes")
    print(f"  medians of {out['repeats']} interleaved repeats; all: rewritten {', '.join(f'{x:.2f}' for x in out['full_s_all'])} s, "
          f"delta {', '.join(f'{x:.3f}' for x in out['delta_s_all'])} s")
    print(f"checkout delta version, cold          {out['checkout_cold_s']:6.2f} s")
    print(f"  with the base resident and copied    {out['checkout_base_copied_s']:6.2f} s   "
          f"bit-identical: {'yes' if out['bit_identical'] else 'NO'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1024, help="n1 of the first commit")
    parser.add_argument("--grow", type=int, default=None, help="rows added by the second commit (default rows/16)")
    parser.add_argument("--n2", type=int, default=1024)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--d-key", type=int, default=128)
    parser.add_argument("--dense-mb", type=float, default=10.0)
    parser.add_argument("--dir", type=Path, default=None, help="where to put the store (default: a temp dir)")
    parser.add_argument("--delta", action="store_true", help="full-shard commit vs delta-shard commit")
    parser.add_argument("--fraction", type=float, default=0.01, help="--delta: share of experts changed")
    parser.add_argument("--repeats", type=int, default=3, help="--delta: interleaved repeats")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.delta:
        with tempfile.TemporaryDirectory(prefix="bench-store-", dir=args.dir) as tmp:
            out = run_delta(args.rows, args.n2, args.d_model, args.d_key, args.dense_mb, args.fraction,
                            args.repeats, Path(tmp))
        print(json.dumps(out, indent=2)) if args.json else print_delta(out)
        return 0 if out["bit_identical"] else 1
    grow = args.grow or max(1, args.rows // 16)
    with tempfile.TemporaryDirectory(prefix="bench-store-", dir=args.dir) as tmp:
        out = run(args.rows, grow, args.n2, args.d_model, args.d_key, args.dense_mb, Path(tmp))
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"PEER layer: {args.rows} x {args.n2} = {out['experts_first']:,} experts, d_model {args.d_model}, float32")
    print(f"(a) first commit        {out['a_first_commit_s']:8.2f} s   {format_bytes(int(out['a_bytes_written']))} written")
    print(f"(b) grow +{grow} rows      {out['b_grow_commit_s']:8.2f} s   {format_bytes(int(out['b_bytes_written']))} written"
          f" ({100 * out['b_over_a']:.1f}% of (a))")
    print(f"(c) rollback            {out['c_rollback_ms_median']:8.2f} ms median, {out['c_rollback_ms_max']:.2f} ms max")
    print(f"(d) checkout cold v1    {out['d_cold_checkout_s']:8.2f} s")
    print(f"    checkout v1 -> v2   {out['d_checkout_v1_to_v2_s']:8.2f} s   loaded {out['d_shards_loaded']} shard "
          f"({format_bytes(int(out['d_bytes_loaded_v1_to_v2']))}), reused {out['d_shards_reused']}")
    print(f"    checkout v2 -> v1   {out['d_checkout_v2_to_v1_s']:8.4f} s   (evict only)")
    print(f"verify (re-hash all)    {out['verify_s']:8.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
