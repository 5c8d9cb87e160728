"""Run by the distributed tests, once alone and once per rank under ``torchrun``.

``python dist_worker.py train OUT STEPS [policy]``: a tiny model trained ``STEPS`` steps on
fixed batches, its state (and the expert rows' optimizer state) saved to ``OUT`` (rank 0).
``python dist_worker.py layer OUT``: one sliced PEER layer's forward and backward
(expert parallel when launched on several ranks), outputs and gradients saved to ``OUT``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import make_tiny_config  # noqa: E402

from lifelong.config import TrainConfig  # noqa: E402
from lifelong.distributed import init_from_env, shutdown  # noqa: E402
from lifelong.model import PEERLM  # noqa: E402
from lifelong.train import random_batches, train  # noqa: E402


def blocks(n: int = 64, length: int = 33, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = rng.integers(1, 60, size=(n, length))
    out[-3:, -5:] = 0  # some padding (pad_id 0), unevenly spread over the ranks
    return out


def run_train(out: str, steps: int, policy: str = "full", expert_parallel: bool = False) -> None:
    dist = init_from_env("cpu", expert_parallel=expert_parallel)
    torch.manual_seed(0)
    model = PEERLM(make_tiny_config(peer_layers=[1]))
    if policy == "grow":
        for layer in model.peer_layers().values():
            layer.freeze()
            layer.grow(2)
    if dist is not None and expert_parallel:
        dist.slice_experts(model)
    cfg = TrainConfig(batch_size=8, steps=steps, warmup_steps=1, lr=3e-3, expert_lr=3e-2)
    res = train(model, random_batches(blocks(), 8, seed=3), cfg, progress=False, dist=dist)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if dist is not None and expert_parallel:
        for name, layer in model.peer_layers().items():
            for t in ("expert_u", "expert_v"):
                state[f"{name}.{t}"] = layer.expert_slice.cat_columns(getattr(layer, t))
    state.update({f"opt.{k}": v for k, v in res.optimizer_state.items()})
    state["losses"] = torch.tensor(res.losses, dtype=torch.float64)
    if dist is None or dist.is_main:
        torch.save(state, out)
    shutdown()


def run_layer(out: str) -> None:
    """Sliced layer vs the whole layer, on every rank: same tokens (replicated), then each
    rank its own half of them (sharded, as in data-parallel training)."""
    import copy

    from lifelong.config import PEERConfig
    from lifelong.peer import PEERLayer

    dist = init_from_env("cpu", expert_parallel=True)
    torch.manual_seed(0)
    whole = PEERLayer(PEERConfig(d_model=32, heads=2, top_k=4, d_key=16, n_rows=8, n_cols=8))
    whole.freeze()
    whole.grow(2)  # trainable ids from 64: row gradients of the new shard only
    sliced = copy.deepcopy(whole)
    sliced.slice_experts(dist.rank, dist.world)
    x = torch.randn(24, 32)
    dy = torch.randn(24, 32)
    report: dict[str, float] = {}

    def run(layer, xs, dys, sharded):
        layer.zero_grad(set_to_none=True)
        xs = xs.clone().requires_grad_(True)
        if sharded:
            with dist.sharded():
                y = layer(xs)
        else:
            y = layer(xs)
        (y * dys).sum().backward()
        rows, gu, gv = layer.grads.pop()
        return y.detach(), xs.grad, layer.query.weight.grad, rows, gu, gv

    whole.eval()  # no BatchNorm batch statistics: the sharded halves would otherwise differ
    sliced.eval()
    ref = run(whole, x, dy, False)
    lo, hi = sliced.expert_slice.lo, sliced.expert_slice.hi
    for mode in ("replicated", "sharded"):
        rows_of = dist.share(24) if mode == "sharded" else slice(0, 24)
        got = run(sliced, x[rows_of], dy[rows_of], mode == "sharded")
        report[f"{mode}.y"] = float((got[0] - ref[0][rows_of]).abs().max())
        report[f"{mode}.dx"] = float((got[1] - ref[1][rows_of]).abs().max())
        q = got[2].clone()
        if mode == "sharded":
            dist.sum_(q)  # each rank has its tokens' share of the query gradient
        report[f"{mode}.dquery"] = float((q - ref[2]).abs().max())
        report[f"{mode}.rows_equal"] = float(torch.equal(got[3], ref[3]))
        report[f"{mode}.du"] = float((got[4] - ref[4][:, lo:hi]).abs().max())
        report[f"{mode}.dv"] = float((got[5] - ref[5][:, lo:hi]).abs().max())
    report["bytes_whole"] = float(whole.expert_u.nbytes + whole.expert_v.nbytes)
    report["bytes_slice"] = float(sliced.expert_u.nbytes + sliced.expert_v.nbytes)
    reports = [None] * dist.world
    torch.distributed.all_gather_object(reports, report)
    if dist.is_main:
        torch.save(reports, out)
    shutdown()


def run_store(out: str, store_path: str) -> None:
    """Check HEAD out sliced on every rank: save each rank's slices and the logits of fixed
    tokens; then commit it again from the slices (rank 0 gathers) as a new version."""
    from expert_store import ExpertStore
    from lifelong.checkpoint import checkout_model, commit_model

    dist = init_from_env("cpu", expert_parallel=True)
    store = ExpertStore.open(store_path)
    model, origin = checkout_model(store, "HEAD", device="cpu")
    dist.slice_experts(model)
    model.eval()
    tokens = torch.from_numpy(blocks(4, 33, seed=5)).long()
    with torch.no_grad():
        logits, _ = model(tokens[:, :-1])
    saved = {"logits": logits, **{f"{n}.{t}": getattr(layer, t).clone() for n, layer in model.peer_layers().items()
                                  for t in ("expert_u", "expert_v")}}
    torch.save(saved, f"{out}.rank{dist.rank}")
    dist.gather_experts(model)
    if dist.is_main:
        commit_model(store, model, origin=origin, message="written by 2 ranks (expert parallel)")
    dist.barrier()
    shutdown()


if __name__ == "__main__":
    kind, out = sys.argv[1], sys.argv[2]
    if kind == "train":
        run_train(out, int(sys.argv[3]), *[a for a in sys.argv[4:5] if a != "--ep"] or ["full"], expert_parallel="--ep" in sys.argv)
    elif kind == "layer":
        run_layer(out)
    elif kind == "store":
        run_store(out, sys.argv[3])
