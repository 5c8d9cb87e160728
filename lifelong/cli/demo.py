"""`lifelong demo`: train a small PEER LM on the standard library's source and sample from it."""

from __future__ import annotations

import argparse
import hashlib
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch

from ..config import ModelConfig, PEERConfig, TrainConfig
from ..model import PEERLM
from ..train import evaluate_loss, random_batches, train

EOS = 256  # document separator of the byte-level tokenizer


def stdlib_blocks(max_bytes: int, block_len: int, heldout: float = 0.05) -> tuple[np.ndarray, np.ndarray, int]:
    """Byte-level (n, block_len + 1) train and held-out blocks from the stdlib's .py files.

    Files are taken in sorted path order; a file is held out by a stable hash of its content.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    train_ids: list[np.ndarray] = []
    held_ids: list[np.ndarray] = []
    total = 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        if not data:
            continue
        is_held = int.from_bytes(hashlib.sha1(data).digest()[:8], "big") / 2**64 < heldout
        ids = np.frombuffer(data, dtype=np.uint8).astype(np.int64)
        (held_ids if is_held else train_ids).append(np.append(ids, EOS))
        total += len(data)
        if total >= max_bytes:
            break

    def pack(parts: list[np.ndarray]) -> np.ndarray:
        flat = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        n = (len(flat) - 1) // block_len
        if n <= 0:
            return np.zeros((0, block_len + 1), dtype=np.int64)
        idx = np.arange(n)[:, None] * block_len + np.arange(block_len + 1)[None, :]
        return flat[idx]

    return pack(train_ids), pack(held_ids), total


def run_demo(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    steps = args.steps or (40 if args.quick else 300)
    peer = PEERConfig(d_model=128, heads=4, top_k=8, d_key=64, n_rows=64, n_cols=64)
    mcfg = ModelConfig(d_model=128, n_layers=3, n_heads=4, block_size=128, peer=peer)
    tcfg = TrainConfig(steps=steps, batch_size=16, lr=2e-3, expert_lr=2e-2, warmup_steps=min(30, steps // 5), seed=args.seed)
    train_blocks, held_blocks, nbytes = stdlib_blocks(2_000_000 if args.quick else 8_000_000, mcfg.block_size)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = PEERLM(mcfg).to(device)
    n_experts = sum(layer.num_experts for layer in model.peer_layers().values())
    print(
        f"data: {nbytes / 1e6:.1f} MB of standard-library source -> {len(train_blocks)} train / "
        f"{len(held_blocks)} held-out blocks of {mcfg.block_size} bytes"
    )
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M dense parameters, {n_experts} PEER experts, device {device}")
    before = evaluate_loss(model, held_blocks, max_batches=4)
    t0 = time.perf_counter()
    result = train(model, random_batches(train_blocks, tcfg.batch_size, tcfg.seed), tcfg, progress=not args.no_progress)
    after = evaluate_loss(model, held_blocks, max_batches=8)
    print(
        f"trained {result.steps} steps in {time.perf_counter() - t0:.0f}s ({result.tokens_per_s:.0f} tokens/s): "
        f"train loss {result.final_loss:.3f}, held-out loss {before:.3f} -> {after:.3f} nats/byte"
    )
    prompt = torch.tensor([list(b"def ")], device=device)
    out = model.generate(prompt, 160, temperature=0.8, top_k=20, generator=torch.Generator(device).manual_seed(args.seed))
    text = bytes(t for t in out[0].tolist() if t < 256).decode("utf-8", errors="replace")
    print("sample:\n" + text)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="train a small PEER LM on embedded data and print a sample",
        description="Train a small PEER language model on the standard library's source, "
        "print the loss before/after and a generated sample. No downloads.",
        epilog="Example:\n  lifelong demo --quick",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="a short run (well under 2 minutes on 2 CPU cores)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default 300, --quick 40)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run_demo)
