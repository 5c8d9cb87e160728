"""Can a router tell two streams apart, token by token? A diagnostic for routing isolation.

Routing isolation (docs/continual.md) can give the new stream its own experts only where
its queries differ from the old streams'. This script measures how far they differ, on a
version of a store: for each PEER layer it collects the layer's inputs ``x`` and one head's
row half-queries ``q1`` on the held-out text of two streams, and reports the held-out
accuracy of a linear classifier (logistic regression) telling them apart: 0.5 = not at
all, 1.0 = perfectly. ``x`` bounds what any query computed from it could do; ``q1`` is
what the frozen query net gives the row keys.

    python scripts/probe_separability.py --store S --old stdlib --new pydoc [--version V]
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
import torch.nn.functional as F

from expert_store import ExpertStore
from lifelong.checkpoint import checkout_model
from lifelong.workspace import open_registry
from streams import StreamError


def layer_inputs(model, blocks: torch.Tensor, batch: int = 32) -> dict[str, torch.Tensor]:
    """Every PEER layer's inputs on ``blocks`` (n, L): name -> (n*L, d)."""
    got: dict[str, list[torch.Tensor]] = {}
    hooks = [layer.register_forward_hook(lambda mod, inp, out, name=name: got.setdefault(name, []).append(
        inp[0].detach().reshape(-1, inp[0].shape[-1]))) for name, layer in model.peer_layers().items()]
    try:
        with torch.no_grad():
            for i in range(0, len(blocks), batch):
                model(blocks[i : i + batch])
    finally:
        for h in hooks:
            h.remove()
    return {name: torch.cat(parts) for name, parts in got.items()}


def separability(a: torch.Tensor, b: torch.Tensor, *, n: int = 20_000, steps: int = 300, seed: int = 0) -> float:
    """Held-out accuracy (20%) of logistic regression telling rows of ``a`` from rows of ``b``."""
    g = torch.Generator().manual_seed(seed)
    n = min(n, len(a), len(b))
    x = torch.cat([a[torch.randperm(len(a), generator=g)[:n]], b[torch.randperm(len(b), generator=g)[:n]]])  # (2n, d)
    y = torch.cat([torch.zeros(n), torch.ones(n)])
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    order = torch.randperm(2 * n, generator=g)
    x, y = x[order], y[order]
    cut = int(1.6 * n)
    w = torch.zeros(x.shape[1], requires_grad=True)
    bias = torch.zeros(1, requires_grad=True)
    opt = torch.optim.Adam([w, bias], lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        F.binary_cross_entropy_with_logits(x[:cut] @ w + bias, y[:cut]).backward()
        opt.step()
    with torch.no_grad():
        return float((((x[cut:] @ w + bias) > 0).float() == y[cut:]).float().mean())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", required=True)
    p.add_argument("--version", default="HEAD", help="default: HEAD")
    p.add_argument("--old", required=True, help="a stream the version was trained on")
    p.add_argument("--new", required=True, help="another stream")
    p.add_argument("--tokens", type=int, default=60_000, help="held-out tokens per stream (default 60000)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    with ExpertStore.open(args.store) as store:
        model, _ = checkout_model(store, args.version, device="cpu")
        model.eval()
        registry = open_registry(store, progress=False)
        width = model.config.block_size + 1
        inputs = {}
        for name in (args.old, args.new):
            try:
                tokens = np.asarray(registry.heldout(name, max_tokens=args.tokens).tokens)
            except StreamError as exc:
                p.error(str(exc))
            if len(tokens) < width:
                p.error(f"stream {name!r} has no held-out text to probe")
            rows = tokens[: len(tokens) // width * width].reshape(-1, width)[:, :-1]
            inputs[name] = layer_inputs(model, torch.from_numpy(rows.astype(np.int64)))
    print(f"linear separability of {args.old} vs {args.new} (held-out accuracy; 0.5 = none, 1.0 = perfect)")
    for name, layer in model.peer_layers().items():
        half = layer.config.d_key // 2
        with torch.no_grad():
            q = {s: layer.queries(inputs[s][name]) for s in inputs}  # (T, h, dk)
        heads = [separability(q[args.old][:, h, :half], q[args.new][:, h, :half]) for h in range(layer.config.heads)]
        print(f"{name}: input x ({inputs[args.old][name].shape[1]}-d) {separability(inputs[args.old][name], inputs[args.new][name]):.3f}; "
              f"row half-query per head ({half}-d) mean {np.mean(heads):.3f}, best {max(heads):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
