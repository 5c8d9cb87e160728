"""Run by the distributed tests: once under ``torchrun`` on 2 ranks, every check in one
process group (one launch: starting ranks is what costs), and in the test process for the
1-process references.

``torchrun ... dist_worker.py OUT STORE DP EP``: every rank saves what it saw to ``OUT/rank{r}.pt``:

- ``layer``: one sliced PEER layer's forward and backward against the whole layer;
- ``train``: a tiny model trained 4 steps with growth (data + expert parallel), its state;
- ``store``: STORE's HEAD (written by 1 process) checked out sliced, committed from the
  ranks' slices (v2), committed again unchanged (v3), v2 checked out sliced again;
- ``cycles``: ``lifelong cycle`` on stream b of DP (data parallel) and of EP (expert
  parallel; no floating-point tensor moves between ranks from its commit on), two copies of
  one trained store; then on EP a cycle whose HEAD is moved before its commit and one whose
  commit fails on rank 0.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as tdist
import torch.distributed.distributed_c10d as c10d

from lifelong.config import ModelConfig, TrainConfig
from lifelong.distributed import Dist, init_from_env, shutdown
from lifelong.model import PEERLM
from lifelong.train import random_batches, train


def blocks(n: int = 64, length: int = 33, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = rng.integers(1, 60, size=(n, length))
    out[-3:, -5:] = 0  # some padding (pad_id 0), unevenly spread over the ranks
    return out


def train_state(dist: Dist | None, config: ModelConfig, steps: int = 4) -> dict[str, torch.Tensor]:
    """A model of ``config`` grown and trained ``steps`` steps on fixed batches: its state (the
    expert tables whole: the ranks' slices side by side), the expert rows' optimizer state, the losses."""
    torch.manual_seed(0)
    model = PEERLM(config)
    for layer in model.peer_layers().values():
        layer.freeze()
        layer.grow(2)
    if dist is not None:
        dist.slice_experts(model)
    cfg = TrainConfig(batch_size=8, steps=steps, warmup_steps=1, lr=3e-3, expert_lr=3e-2)
    res = train(model, random_batches(blocks(), 8, seed=3), cfg, progress=False, dist=dist)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if dist is not None:
        for name, layer in model.peer_layers().items():
            for t in ("expert_u", "expert_v"):
                state[f"{name}.{t}"] = layer.expert_slice.cat_columns(getattr(layer, t))  # the test's own gather
    state.update({f"opt.{k}": v for k, v in res.optimizer_state.items()})
    state["losses"] = torch.tensor(res.losses, dtype=torch.float64)
    return state


def check_layer(dist: Dist) -> dict[str, float]:
    """Sliced layer vs the whole layer: same tokens on every rank (replicated), then each rank
    its own half of them (sharded, as in data-parallel training; BatchNorm synced)."""
    import copy

    from lifelong.config import PEERConfig
    from lifelong.peer import PEERLayer

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
    return report


def _tables(model: Any) -> dict[str, torch.Tensor]:
    return {f"{n}.{t}": getattr(layer, t).clone() for n, layer in model.peer_layers().items() for t in ("expert_u", "expert_v")}


def check_store(dist: Dist, path: str) -> dict[str, Any]:
    """HEAD (1 process wrote it) checked out sliced; committed from the slices (v2) and again
    unchanged (v3: every shard reused); v2 checked out sliced again."""
    from expert_store import ExpertStore
    from lifelong.checkpoint import ShardMap, checkout_model, commit_model

    store = ExpertStore.open(path)
    model, origin = checkout_model(store, "HEAD", device="cpu", expert_slice=dist.expert_slice)
    model.eval()
    tokens = torch.from_numpy(blocks(4, 33, seed=5)).long()
    with torch.no_grad():
        logits, _ = model(tokens[:, :-1])
    out: dict[str, Any] = {"logits": logits, "tables": _tables(model)}
    slices = dist.write_slices(store, model, origin)
    v2 = dist.on_main(lambda: commit_model(store, model, origin=origin, message="written by 2 ranks", slices=slices).version)
    again = dist.write_slices(store, model, ShardMap.of(v2))
    v3 = dist.on_main(lambda: commit_model(store, model, origin=ShardMap.of(v2), message="unchanged", slices=again).version)
    out["v2"], out["v3"] = v2, v3
    back, _ = checkout_model(store, v2.id, device="cpu", expert_slice=dist.expert_slice)
    out["v2_tables"] = _tables(back)
    store.close()
    return out


class _FloatTraffic:
    """Records every floating-point tensor a collective carries while :attr:`on`."""

    NAMES = ("all_reduce", "all_gather", "gather", "broadcast", "all_gather_into_tensor", "reduce", "scatter", "send", "recv",
             "isend", "irecv", "reduce_scatter", "all_to_all")

    def __init__(self) -> None:
        self.on = False
        self.seen: list[tuple[str, str, tuple[int, ...]]] = []
        for module in (tdist, c10d):
            for name in self.NAMES:
                if hasattr(module, name):
                    setattr(module, name, self._spy(name, getattr(module, name)))

    def _spy(self, name: str, fn: Any) -> Any:
        def wrapped(*args: Any, **kw: Any) -> Any:
            if self.on:
                for t in [*args, *kw.values()]:
                    for x in t if isinstance(t, (list, tuple)) else [t]:
                        if isinstance(x, torch.Tensor) and x.is_floating_point():
                            self.seen.append((name, str(x.dtype), tuple(x.shape)))
            return fn(*args, **kw)

        return wrapped


FLAGS = ["--policy", "freeze-experts", "--grow-rows", "2", "--budget", "6000", "--eval-tokens", "1024", "--batch-size", "8",
         "--no-progress"]


def check_cycles(dist: Dist, dp: str, ep: str) -> dict[str, Any]:
    """``lifelong cycle`` (the CLI, in this process) on both ranks: data parallel on the store
    ``dp``, expert parallel on ``ep`` (from the same trained parent), then on ``ep`` a cycle
    whose HEAD moves before its commit and one whose commit fails on rank 0."""
    import contextlib
    import io

    import lifelong.cycle as cycle_module
    import lifelong.distributed as dist_module
    from expert_store import StoreWriteError
    from lifelong.cli.main import main

    traffic = _FloatTraffic()
    out: dict[str, Any] = {}
    real_write, real_commit, real_cycle = Dist.write_slices, cycle_module.commit_model, cycle_module.run_cycle

    def write_slices(self, store, model, origin=None):  # the commit starts here
        out["committed_tables"] = _tables(model)
        traffic.on = True
        return real_write(self, store, model, origin)

    def run_cycle(*args, **kw):  # what the cycle raised on this rank, before the CLI turns it into an exit code
        try:
            return real_cycle(*args, **kw)
        except Exception as exc:
            out["raised"] = {"error": type(exc).__name__, **{k: getattr(exc, k, None) for k in ("cycle_id", "version", "ref", "head")}}
            raise

    Dist.write_slices = write_slices  # type: ignore[method-assign]
    cycle_module.run_cycle = run_cycle
    dist_module.shutdown = lambda: None  # the CLI ends the process group when done; later checks need it

    def cycle(name: str, store: str, stream: str, *flags: str, commit=None) -> None:
        cycle_module.commit_model = commit or real_commit
        said = io.StringIO()
        with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
            code = main(["--store", store, "cycle", "--stream", stream, *FLAGS, *flags])
        traffic.on = False
        out[name] = {"exit": code, "said": said.getvalue(), "float_traffic": traffic.seen,
                     "tables": out.pop("committed_tables", None), "raised": out.pop("raised", None)}
        traffic.seen = []

    def moved_then_commit(store, model, **kw):  # a rollback lands between training and the commit
        if kw["ref"] == "HEAD":
            store.rollback(2, why="test: HEAD moves while the cycle runs")
        return real_commit(store, model, **kw)

    def disk_full(store, model, **kw):
        raise StoreWriteError("disk full while writing the store database; nothing was committed")

    cycle("data_parallel", dp, "b")
    cycle("branch", dp, "c", "--policy", "branch")  # a frozen branch; held-out loss through the mixture, split across ranks
    cycle("expert_parallel", ep, "b", "--expert-parallel")
    cycle("head_moved", ep, "c", "--expert-parallel", commit=moved_then_commit)
    cycle("failed", ep, "c", "--expert-parallel", commit=disk_full)
    traffic.on = True  # the spy does see what a collective of floats carries
    dist.sum_(torch.zeros(3))
    traffic.on, out["control"] = False, traffic.seen
    return out


def main(out: str, store: str, dp: str, ep: str) -> None:
    sys.path.insert(0, str(Path(__file__).parent))  # run as a script: the tests' conftest is importable
    from conftest import make_tiny_config

    dist = init_from_env("cpu", expert_parallel=True)
    assert dist is not None, "run me under torchrun"
    results = {"layer": check_layer(dist), "train": train_state(dist, make_tiny_config(peer_layers=[1])),
               "store": check_store(dist, store),
               "cycles": check_cycles(dist, dp, ep)}
    torch.save(results, f"{out}/rank{dist.rank}.pt")
    dist.barrier()
    shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:5])
