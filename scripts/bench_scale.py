"""Figures of docs/scale.md: memory per rank of a PEER layer with and without expert
parallelism, and tokens/s of a cycle at 1 and N processes.

    python scripts/bench_scale.py memory --rows 1024 --cols 1024 --d-model 256            # P = 1
    python -m torch.distributed.run --standalone --nproc-per-node 2 scripts/bench_scale.py memory --rows 1024 --cols 1024 --d-model 256
    python scripts/bench_scale.py cycle --store DIR --stream NAME --nproc 2 [cycle flags...]

``memory`` builds one layer (the tables allocated as this rank's slice only), runs one
training forward + backward on a batch, and prints the resident set size (RSS) before and
after the tables and the peak, measured by the OS (``/proc/self/status``), per rank.
``cycle`` runs ``lifelong cycle --json`` and prints its tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch


def _mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def memory(args: argparse.Namespace) -> None:
    from lifelong.config import PEERConfig
    from lifelong.distributed import init_from_env, shutdown
    from lifelong.experts import ExpertSlice
    from lifelong.peer import PEERLayer

    dist = init_from_env("cpu", expert_parallel=True)
    rank, world = (dist.rank, dist.world) if dist is not None else (0, 1)
    base = _mib("VmRSS")
    cfg = PEERConfig(d_model=args.d_model, heads=args.heads, top_k=args.top_k, d_key=args.d_key, n_rows=args.rows, n_cols=args.cols)
    with torch.device("meta"):
        layer = PEERLayer(cfg)
    layer.to_empty(device="cpu")
    for p in layer.parameters():
        torch.nn.init.normal_(p.data, std=0.1)
    n, width = args.rows * args.cols, args.d_model // world
    gen = torch.Generator().manual_seed(rank)
    layer.expert_u = torch.randn(n, width, generator=gen) / args.d_model**0.5  # this rank's slice, never the whole table
    layer.expert_v = torch.randn(n, width, generator=gen) / args.d_model**0.5
    layer.background = torch.zeros(n)
    if world > 1:
        layer.expert_slice = ExpertSlice(rank, world, args.d_model)
    tables = _mib("VmRSS")
    x = torch.randn(args.tokens, args.d_model, requires_grad=True)
    t0 = time.perf_counter()
    if dist is not None:
        with dist.sharded():
            y = layer(x)
    else:
        y = layer(x)
    y.square().mean().backward()
    step_s = time.perf_counter() - t0
    row = {"world": world, "rank": rank, "experts": n, "d_model": args.d_model, "table_MiB": round(tables - base, 1),
           "rss_MiB": round(_mib("VmRSS"), 1), "peak_rss_MiB": round(_mib("VmHWM"), 1), "tokens_per_rank": args.tokens,
           "fwd_bwd_s": round(step_s, 3)}
    rows = [None] * world
    if dist is not None:
        torch.distributed.all_gather_object(rows, row)
    else:
        rows = [row]
    if rank == 0:
        for r in rows:
            print(json.dumps(r))
    shutdown()


def cycle(args: argparse.Namespace, rest: list[str]) -> None:
    cmd = [sys.executable, "-m", "lifelong", "--store", args.store, "cycle", "--stream", args.stream, "--json", "--no-progress",
           *(["--nproc", str(args.nproc)] if args.nproc > 1 else []), *rest]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    if out.returncode:
        sys.exit(out.stdout[-2000:] + out.stderr[-2000:])
    text = out.stdout[out.stdout.index("{"):]
    res = json.loads(text)
    m = res["metrics"]
    print(json.dumps({"nproc": args.nproc, "steps": m["steps"], "train_tokens_per_s": round(m["tokens_per_s"]),
                      "cycle_s": round(res["seconds"], 1), "wall_s": round(time.perf_counter() - t0, 1)}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    m = sub.add_parser("memory")
    m.add_argument("--rows", type=int, default=1024)
    m.add_argument("--cols", type=int, default=1024)
    m.add_argument("--d-model", type=int, default=256)
    m.add_argument("--heads", type=int, default=8)
    m.add_argument("--top-k", type=int, default=16)
    m.add_argument("--d-key", type=int, default=128)
    m.add_argument("--tokens", type=int, default=1024, help="tokens per rank in the forward + backward")
    c = sub.add_parser("cycle")
    c.add_argument("--store", required=True)
    c.add_argument("--stream", required=True)
    c.add_argument("--nproc", type=int, default=1)
    args, rest = p.parse_known_args()
    if args.what == "memory":
        memory(args)
    else:
        cycle(args, rest)


if __name__ == "__main__":
    main()
