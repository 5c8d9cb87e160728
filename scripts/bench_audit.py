"""Benchmark the retrieval audit and compare retrieval speeds.

1. Audit time and peak memory (RSS) of :func:`lifelong.audit_exact.audit_layer` on one PEER layer
   (default N = 1024^2 experts, d_key 128, 8 heads, top_k 16, d_model 256) with 4096 queries
   per head (random inputs through the layer's query net in eval mode).
2. Retrieval speed on the same kind of queries for N = 128^2 .. 1024^2: product keys
   (the layer's ``retrieve``) vs FAISS ``IndexFlatIP`` search vs brute-force torch matmul +
   topk over the materialised full keys. Product keys cost ~ sqrt(N), the flat searches ~ N,
   so the speed-up grows like sqrt(N) (x2 per x4 in N).

    python scripts/bench_audit.py            # full size (about 5 minutes on 2 CPU cores)
    python scripts/bench_audit.py --quick    # small sizes, seconds
    python scripts/bench_audit.py --json     # one JSON object per line
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
from collections.abc import Callable

import faiss
import torch

from lifelong import PEERConfig, PEERLayer
from lifelong.audit_exact import audit_layer


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples this process's RSS every few milliseconds in a thread; ``peak`` after exit."""

    def __init__(self, every_s: float = 0.01):
        self.every_s, self.peak, self._stop = every_s, 0, threading.Event()

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def make_layer(side: int, args: argparse.Namespace) -> PEERLayer:
    """A PEER layer with a side x side grid; the expert tables (unused by retrieval and
    audit) are replaced by zero-stride views so that RSS measures retrieval, not 2 x N x d."""
    torch.manual_seed(0)
    cfg = PEERConfig(d_model=args.d_model, heads=args.heads, top_k=args.top_k, d_key=args.d_key, n_rows=side, n_cols=side)
    layer = PEERLayer(cfg).eval()
    stub = torch.zeros(1, cfg.d_model).expand(layer.num_experts, cfg.d_model)  # (N, d), no memory
    layer.expert_u, layer.expert_v = stub, stub
    return layer


@torch.no_grad()
def make_queries(layer: PEERLayer, tokens: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return layer.queries(torch.randn(tokens, layer.config.d_model, generator=g))  # (T, h, dk)


def emit(args: argparse.Namespace, record: dict) -> None:
    if args.json:
        print(json.dumps(record), flush=True)


def bench_audit(args: argparse.Namespace) -> dict:
    layer = make_layer(args.audit_side, args)
    q = make_queries(layer, args.tokens)  # (T, h, dk)
    with PeakRSS() as mem:
        t0, c0 = time.perf_counter(), time.process_time()
        audit = audit_layer(layer, q, chunk_rows=args.chunk_rows, progress=not args.json)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    record = {
        "bench": "audit",
        "experts": layer.num_experts,
        "grid": f"{layer.n_rows}x{layer.n_cols}",
        "d_key": args.d_key,
        "heads": args.heads,
        "top_k": args.top_k,
        "queries_per_head": args.tokens,
        "chunk_rows": audit.chunk_rows,
        "seconds": round(seconds, 2),
        "seconds_exact": round(audit.seconds_exact, 2),
        "seconds_router": round(audit.seconds_router, 3),
        "seconds_compare": round(audit.seconds_compare, 2),
        "cpu_seconds": round(cpu, 1),
        "loadavg_1m_after": os.getloadavg()[0],
        "rss_before_mib": round(mem.start / 2**20, 1),
        "rss_peak_mib": round(mem.peak / 2**20, 1),
        "rss_added_mib": round((mem.peak - mem.start) / 2**20, 1),
        "recall": audit.total.recall,
        "recall_up_to_ties": audit.total.recall_up_to_ties,
        "tied_ids": audit.total.tied_ids,
        "missed_ids": audit.total.missed_ids,
        "max_score_diff": audit.total.max_score_diff,
        "backend": audit.backend,
    }
    emit(args, record)
    if not args.json:
        print(
            f"audit  N={layer.num_experts:,} ({record['grid']}), {args.tokens} queries x {args.heads} heads, k={args.top_k}: "
            f"{seconds:.1f} s (exact {audit.seconds_exact:.1f} s, router {audit.seconds_router:.2f} s, "
            f"compare {audit.seconds_compare:.1f} s; CPU time {cpu:.0f} s, load average {os.getloadavg()[0]:.1f}); RSS {record['rss_before_mib']:.0f} -> peak {record['rss_peak_mib']:.0f} MiB "
            f"(+{record['rss_added_mib']:.0f} MiB); recall {audit.total.recall:.6f}, up to ties "
            f"{audit.total.recall_up_to_ties:.6f}, ties {audit.total.tied_ids}, misses {audit.total.missed_ids}, "
            f"max|ds| {audit.total.max_score_diff:.2e}",
            flush=True,
        )
    return record


def interleaved_best(fns: dict[str, Callable[[], object]], min_total_s: float = 3.0, max_rounds: int = 50) -> dict[str, tuple[float, float]]:
    """(wall, CPU) seconds of the fastest run of each function.

    Rounds run every function once, in turn, so that all of them meet the same background load
    (this machine's cores are shared); at least 2 rounds, more while under ``min_total_s``. CPU =
    process time over all threads, less sensitive to competing processes than wall time.
    """
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in fns}
    spent, rounds = 0.0, 0
    while rounds < 2 or (rounds < max_rounds and spent < min_total_s):
        for name, fn in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            runs[name].append((time.perf_counter() - t0, time.process_time() - c0))
            spent += runs[name][-1][0]
        rounds += 1
    return {name: min(r) for name, r in runs.items()}


@torch.no_grad()
def bench_speed(side: int, args: argparse.Namespace) -> dict:
    layer = make_layer(side, args)
    q = make_queries(layer, args.speed_tokens)  # (T, h, dk)
    flat_q = q.reshape(-1, args.d_key).contiguous()  # (T*h, dk)
    k = args.top_k
    keys = layer.full_keys()  # (N, dk), materialised once (not timed)
    index = faiss.IndexFlatIP(args.d_key)
    index.add(keys.numpy())
    xq = flat_q.numpy()
    chunk = max(1, (256 << 20) // (4 * keys.shape[0]))  # queries per matmul: (chunk, N) <= 256 MiB

    def brute() -> None:
        for a in range(0, flat_q.shape[0], chunk):
            (flat_q[a : a + chunk] @ keys.t()).topk(k, dim=-1)

    best = interleaved_best({"pk": lambda: layer.retrieve(q), "faiss": lambda: index.search(xq, k), "torch": brute})
    (t_pk, c_pk), (t_faiss, c_faiss), (t_torch, c_torch) = best["pk"], best["faiss"], best["torch"]
    del index
    n = flat_q.shape[0]
    record = {
        "bench": "speed",
        "experts": layer.num_experts,
        "grid": f"{side}x{side}",
        "query_vectors": n,
        "us_per_query_product_keys": t_pk / n * 1e6,
        "us_per_query_faiss_flat": t_faiss / n * 1e6,
        "us_per_query_torch_matmul": t_torch / n * 1e6,
        "speedup_vs_faiss": t_faiss / t_pk,
        "speedup_vs_torch": t_torch / t_pk,
        "cpu_s_product_keys": c_pk,
        "cpu_s_faiss_flat": c_faiss,
        "cpu_s_torch_matmul": c_torch,
        "cpu_speedup_vs_faiss": c_faiss / c_pk,
        "cpu_speedup_vs_torch": c_torch / c_pk,
        "loadavg_1m": os.getloadavg()[0],
    }
    emit(args, record)
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes (seconds)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--audit-side", type=int, default=None, help="n1 = n2 of the audited layer (default 1024; quick 128)")
    p.add_argument("--tokens", type=int, default=None, help="audit queries per head (default 4096; quick 512)")
    p.add_argument("--speed-tokens", type=int, default=None, help="tokens for the speed table (x heads query vectors; default 512; quick 128)")
    p.add_argument("--sides", type=int, nargs="*", default=None, help="grid sides for the speed table (default 128 256 512 1024)")
    p.add_argument("--chunk-rows", type=int, default=None, help="rows of full keys per FAISS chunk (default: ~64 MiB)")
    p.add_argument("--skip-audit", action="store_true")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--top-k", type=int, default=16)
    p.add_argument("--d-key", type=int, default=128)
    args = p.parse_args(argv)
    args.audit_side = args.audit_side or (128 if args.quick else 1024)
    args.tokens = args.tokens or (512 if args.quick else 4096)
    args.speed_tokens = args.speed_tokens or (128 if args.quick else 512)
    args.sides = args.sides or ([32, 64, 128] if args.quick else [128, 256, 512, 1024])

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    machine = {
        "bench": "machine",
        "cpu_threads": args.threads,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "faiss": faiss.__version__,
        "python": platform.python_version(),
        "processor": platform.processor() or platform.machine(),
        "loadavg_1m_at_start": os.getloadavg()[0],
    }
    emit(args, machine)
    if not args.json:
        print(
            f"torch {torch.__version__}, faiss {faiss.__version__}, {args.threads} threads of {os.cpu_count()} CPUs, "
            f"load average {os.getloadavg()[0]:.2f}",
            flush=True,
        )

    if not args.skip_audit:
        bench_audit(args)
    if not args.skip_speed:
        if not args.json:
            print(f"load average {os.getloadavg()[0]:.2f} before the speed table", flush=True)
        rows = [bench_speed(side, args) for side in args.sides]
        if not args.json:
            print(f"\nretrieval speed, top-{args.top_k}, {rows[0]['query_vectors']} query vectors (us per query vector)")
            print(
                f"{'N':>10} {'grid':>10} {'product keys':>13} {'faiss flat':>11} {'torch matmul':>13} "
                f"{'x vs faiss':>11} {'x vs torch':>11} {'CPU x faiss':>12} {'CPU x torch':>12} {'load':>5}"
            )
            for r in rows:
                print(
                    f"{r['experts']:>10,} {r['grid']:>10} {r['us_per_query_product_keys']:>13.2f} {r['us_per_query_faiss_flat']:>11.1f} "
                    f"{r['us_per_query_torch_matmul']:>13.1f} {r['speedup_vs_faiss']:>11.0f} {r['speedup_vs_torch']:>11.0f} "
                    f"{r['cpu_speedup_vs_faiss']:>12.0f} {r['cpu_speedup_vs_torch']:>12.0f} {r['loadavg_1m']:>5.1f}"
                )
            for a, b in zip(rows, rows[1:]):
                g = [b[key] / a[key] for key in ("speedup_vs_faiss", "speedup_vs_torch", "cpu_speedup_vs_faiss", "cpu_speedup_vs_torch")]
                print(
                    f"  speed-up growth {a['grid']} -> {b['grid']}: wall x{g[0]:.2f} (faiss), x{g[1]:.2f} (torch); "
                    f"CPU x{g[2]:.2f} (faiss), x{g[3]:.2f} (torch); sqrt(N) ratio x{(b['experts'] / a['experts']) ** 0.5:.2f}"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
