"""Benchmark: what frozen branches (policy branch) cost at prediction time, and in memory.

Builds the continual benchmark's PEER model (4 blocks, d_model 128, PEER in every block,
8,192 experts) and gives it 0..K frozen branches (copies of its dense weights; the cost does
not depend on their values), then times held-out evaluation (``evaluate_loss``: batches of
8 x 128 tokens, eval mode) with the branches' posterior mixture. The branch counts are
interleaved over ``--rounds`` rounds (the machine is shared); medians are printed, and the
ratio to the model without branches. Memory: the bytes one branch adds (its dense weights).

    python scripts/bench_branches.py                  # K = 0..4
    python scripts/bench_branches.py --max-branches 8 --rounds 5 --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np
import torch

from lifelong.branches import snapshot
from lifelong.config import ModelConfig, PEERConfig
from lifelong.evaluate import evaluate_loss
from lifelong.model import PEERLM


def bench_model() -> PEERLM:
    peer = PEERConfig(d_model=128, heads=8, top_k=16, d_key=64, n_rows=32, n_cols=64)
    return PEERLM(ModelConfig(d_model=128, n_layers=4, n_heads=4, block_size=128, ffn_mult=1, peer_layers=[0, 1, 2, 3], peer=peer))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-branches", type=int, default=4, help="time 0..N frozen branches (default 4)")
    p.add_argument("--blocks", type=int, default=64, help="held-out blocks of 129 tokens per timing (default 64)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported (default 3)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true", help="one JSON object per branch count on stdout")
    args = p.parse_args(argv)
    if args.max_branches < 0 or args.blocks <= 0 or args.rounds <= 0:
        p.error("--max-branches must be >= 0, --blocks and --rounds positive")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = bench_model().eval()
    branch = snapshot(model)
    branch_bytes = sum(t.numel() * t.element_size() for t in branch.tensors.values())
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    blocks = np.random.default_rng(0).integers(0, 256, (args.blocks, 129)).astype(np.int64)
    times: dict[int, list[float]] = {k: [] for k in range(args.max_branches + 1)}
    evaluate_loss(model, blocks[:8])  # warm-up
    for _ in range(args.rounds):
        for k in times:
            model.branches = [branch] * k
            t = time.perf_counter()
            evaluate_loss(model, blocks)
            times[k].append(time.perf_counter() - t)
    tokens = args.blocks * 128
    base = statistics.median(times[0])
    print(f"one branch holds {branch_bytes / 2**20:.2f} MiB of dense weights ({branch_bytes / model_bytes:.1%} of the "
          f"model's {model_bytes / 2**20:.2f} MiB); {tokens:,} tokens per timing, medians of {args.rounds} rounds, "
          f"{args.threads} threads", file=sys.stderr)
    print(f"{'branches':>8}  {'tokens/s':>9}  {'time vs none':>12}", file=sys.stderr)
    for k, ts in times.items():
        med = statistics.median(ts)
        print(f"{k:>8}  {tokens / med:>9,.0f}  {med / base:>11.2f}x", file=sys.stderr)
        if args.json:
            print(json.dumps({"branches": k, "tokens_per_s": tokens / med, "time_ratio": med / base,
                              "branch_bytes": branch_bytes, "model_bytes": model_bytes}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
