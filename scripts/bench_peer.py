"""Benchmark: PEER layer training/inference speed and memory against peer-pytorch and a dense FFN.

Each (implementation, N, mode) runs in its own subprocess; peak memory is the subprocess's
peak RSS minus its RSS just before the layer is built, so parameters, gradients, optimizer
state and activations all count. Timings are medians over ``--steps`` steps per process and
over ``--rounds`` rounds that interleave the implementations (the machine is shared).

    python scripts/bench_peer.py                 # full table (N = 128^2 .. 1024^2)
    python scripts/bench_peer.py --quick         # N = 128^2, 256^2
    python scripts/bench_peer.py --json          # one JSON object per line

peer-pytorch comes with the `bench` extra: pip install -e '.[bench]'.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

IMPLS = ["lifelong", "lifelong-grown", "peer-pytorch", "dense"]
D_MODEL, HEADS, TOP_K, D_KEY = 256, 8, 16, 128
BATCH, SEQ = 4, 512


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_one(impl: str, n: int, mode: str, steps: int, threads: int) -> dict:
    """Runs inside the subprocess: build, warm up, time ``steps`` steps."""
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    side = int(round(n**0.5))
    x = torch.randn(BATCH, SEQ, D_MODEL)
    w = torch.randn(BATCH, SEQ, D_MODEL)
    base = rss_mb()

    row_opt = None
    if impl in ("lifelong", "lifelong-grown"):
        from lifelong import PEERConfig, PEERLayer, RowAdam

        if impl == "lifelong":
            layer = PEERLayer(PEERConfig(d_model=D_MODEL, heads=HEADS, top_k=TOP_K, d_key=D_KEY, n_rows=side, n_cols=side))
        else:  # grown to N: only the newest 1/16 of the rows trains
            new_rows = side // 16
            cfg = PEERConfig(d_model=D_MODEL, heads=HEADS, top_k=TOP_K, d_key=D_KEY, n_rows=side - new_rows, n_cols=side)
            layer = PEERLayer(cfg)
            layer.freeze()
            layer.grow(new_rows)
        assert layer.num_experts == n
        params = [p for p in layer.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-3)
        row_opt = RowAdam([layer], lr=1e-2)
    elif impl == "peer-pytorch":
        from PEER_pytorch import PEER

        layer = PEER(
            dim=D_MODEL,
            heads=HEADS,
            num_experts=n,
            num_experts_per_head=TOP_K,
            product_key_topk=TOP_K,
            dim_key=D_KEY,
            non_competing_scores=False,
        )
        opt = torch.optim.Adam(layer.parameters(), lr=1e-3)
    elif impl == "dense":
        hidden = HEADS * TOP_K  # same number of active neurons
        layer = torch.nn.Sequential(torch.nn.Linear(D_MODEL, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, D_MODEL))
        opt = torch.optim.Adam(layer.parameters(), lr=1e-3)
    else:
        raise SystemExit(f"unknown impl {impl}")

    def train_step() -> None:
        xi = x.detach().requires_grad_()  # gradient to the input, as inside a model
        y = layer(xi)
        opt.zero_grad(set_to_none=True)
        (y * w).sum().backward()
        opt.step()
        if row_opt is not None:
            row_opt.step()

    @torch.no_grad()
    def forward_step() -> None:
        layer(x)

    if mode == "train":
        layer.train()
        step = train_step
    else:
        layer.eval()
        step = forward_step
    step()  # warm-up (allocates optimizer state)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {
        "impl": impl,
        "num_experts": n,
        "mode": mode,
        "tokens_per_s": BATCH * SEQ / med,
        "step_ms": med * 1e3,
        "peak_mem_mb": peak_rss_mb() - base,
        "steps": steps,
        "threads": threads,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="*", default=None, help="grid sides (N = side^2)")
    ap.add_argument("--impls", nargs="*", default=IMPLS, choices=IMPLS)
    ap.add_argument("--modes", nargs="*", default=["train", "forward"], choices=["train", "forward"])
    ap.add_argument("--steps", type=int, default=5, help="timed steps per configuration (median reported)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of subprocesses, interleaving implementations (median reported)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="N = 128^2 and 256^2 only")
    ap.add_argument("--json", action="store_true", help="one JSON object per line")
    ap.add_argument("--_one", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args._one:
        impl, n, mode = args._one
        print(json.dumps(run_one(impl, int(n), mode, args.steps, args.threads)))
        return

    sides = args.sizes or ([128, 256] if args.quick else [128, 256, 512, 1024])
    rows = []
    if not args.json:
        print(f"{'impl':<16}{'N':>10}{'mode':>9}{'tokens/s':>12}{'step ms':>10}{'peak MB':>10}")
    for side in sides:
        for mode in args.modes:
            runs: dict[str, list[dict]] = {impl: [] for impl in args.impls}
            for _ in range(args.rounds):  # interleaved, so a noisy moment hits every implementation
                for impl in args.impls:
                    cmd = [sys.executable, __file__, "--_one", impl, str(side * side), mode, "--steps", str(args.steps), "--threads", str(args.threads)]
                    proc = subprocess.run(cmd, capture_output=True, text=True)
                    if proc.returncode != 0:
                        runs[impl].append({"error": (proc.stderr.strip().splitlines() or ["?"])[-1]})
                    else:
                        runs[impl].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            for impl in args.impls:
                good = [r for r in runs[impl] if "error" not in r]
                if not good:
                    row = {"impl": impl, "num_experts": side * side, "mode": mode, "error": runs[impl][-1]["error"]}
                else:
                    row = dict(good[0])
                    row["step_ms"] = statistics.median(r["step_ms"] for r in good)
                    row["tokens_per_s"] = BATCH * SEQ / (row["step_ms"] / 1e3)
                    row["peak_mem_mb"] = statistics.median(r["peak_mem_mb"] for r in good)
                    row["rounds"] = len(good)
                rows.append(row)
                if args.json:
                    print(json.dumps(row), flush=True)
                elif "error" in row:
                    print(f"{impl:<16}{side * side:>10}{mode:>9}  failed: {row['error']}", flush=True)
                else:
                    print(
                        f"{impl:<16}{side * side:>10}{mode:>9}{row['tokens_per_s']:>12.0f}{row['step_ms']:>10.1f}{row['peak_mem_mb']:>10.0f}",
                        flush=True,
                    )
    if args.json:
        return
    ok = {(r["impl"], r["num_experts"], r["mode"]): r for r in rows if "error" not in r}
    big, small = sides[-1] ** 2, sides[0] ** 2
    ours, theirs = ok.get(("lifelong", big, "train")), ok.get(("peer-pytorch", big, "train"))
    if ours and theirs:
        print(
            f"\nN={big}: lifelong/peer-pytorch train speed {ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x "
            f"(target >= 3x), peak memory {ours['peak_mem_mb'] / theirs['peak_mem_mb']:.2f}x (target <= 0.5x)"
        )
    g_big, g_small = ok.get(("lifelong-grown", big, "train")), ok.get(("lifelong-grown", small, "train"))
    if g_big and g_small:
        print(f"lifelong-grown step time N={big} / N={small}: {g_big['step_ms'] / g_small['step_ms']:.2f}x (target <= 1.5x)")


if __name__ == "__main__":
    main()
