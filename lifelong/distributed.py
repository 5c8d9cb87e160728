"""Cycles on several processes: ``torch.distributed`` launched by ``torchrun`` (DESIGN.md §10).

No home-made pool or RPC: ``torchrun`` (``torch.distributed.run``) starts the ranks and tears
them all down when one dies; collectives run on gloo (CPU) or NCCL (GPU).

- **Data parallel**: every rank holds the model and takes rows ``[r*B/P, (r+1)*B/P)`` of
  every global batch (:meth:`Dist.shard`). Dense parameters are averaged by DDP; the query
  BatchNorm normalises with the statistics of the whole global batch
  (:func:`sync_batch_norm`); the expert-row gradients (row ids + rows) that
  :class:`~lifelong.optim.RowAdam` applies are gathered, summed and averaged
  (:meth:`Dist.merge_row_grads`), so every rank makes the identical update. Losses are
  token sums over the global non-pad count, so the averaged gradient is the 1-process one.
- **Expert parallel** (``--expert-parallel``): every expert table is split along d_model
  (:meth:`Dist.slice_experts`); see :class:`lifelong.experts.ExpertMixSliced`. At commit
  each rank writes its columns as objects of their own (:meth:`Dist.write_slices`) and rank
  0 commits them as sliced shards: no rank ever holds a whole table.
- Rank 0 alone holds the cycle lease, writes the store's rows and moves the cursor
  (:meth:`Dist.on_main` runs a step there and hands its result, or its error, to every rank).
- Evaluation splits each batch's rows across ranks and sums (loss, tokens) and router usage.
  The retrieval audit is not part of a cycle; ``lifelong audit --nproc N`` splits its queries
  across ranks the same way and sums the counts (:func:`lifelong.audit_exact.audit_layer`).

Nothing changes when not distributed: every caller takes ``dist=None`` as "one process".
"""

from __future__ import annotations

import os
import pickle
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as tdist
import torch.nn.functional as F
from torch import Tensor, nn

from expert_store import StoreNotSharedError, check_share_marker, write_share_marker
from expert_store.sharing import CHECK_TIMEOUT_S

from .errors import ConfigError, LifelongError

__all__ = ["Dist", "DistributedError", "RankError", "init_from_env", "shutdown", "sharded_group", "sync_batch_norm",
           "check_layout", "launch_args", "TIMEOUT_ENV"]

T = TypeVar("T")
TIMEOUT_ENV = "LIFELONG_DIST_TIMEOUT"  # seconds a collective may wait for a peer (default 1800)

_SHARDED: list[Any] = []  # the process group while each rank runs its own share of the tokens


class DistributedError(LifelongError):
    """A multi-process run could not start or lost a rank."""


class RankError(DistributedError):
    """The step rank 0 ran for everyone failed there; every rank raises this."""


def sharded_group() -> Any | None:
    """The process group while ranks run disjoint tokens (training, split evaluation), else None."""
    return _SHARDED[-1] if _SHARDED else None


class _AllReduceSum(torch.autograd.Function):
    """Differentiable sum over ranks: the gradient of a sum is the sum of the gradients."""

    @staticmethod
    def forward(ctx, t, group):  # type: ignore[override]
        ctx.group = group
        out = t.clone(memory_format=torch.contiguous_format)
        tdist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        g = g.clone(memory_format=torch.contiguous_format)
        tdist.all_reduce(g, group=ctx.group)
        return g, None


def sync_batch_norm(x: Tensor, bn: nn.BatchNorm1d, group: Any) -> Tensor:
    """``bn`` in training mode over the rows of ``x`` (T, C) of every rank together.

    ``torch.nn.SyncBatchNorm`` needs a GPU; this is the same statistics on any backend, with
    a differentiable all-reduce. Running statistics move exactly as one process's would."""
    n = x.new_tensor([float(x.shape[0])])
    tdist.all_reduce(n, group=group)
    mean = _AllReduceSum.apply(x.sum(0), group) / n  # (C,)
    var = _AllReduceSum.apply((x - mean).pow(2).sum(0), group) / n  # (C,) biased, as batch norm normalises
    if bn.track_running_stats and bn.running_mean is not None:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)  # type: ignore[union-attr]
            factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
            bn.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
            bn.running_var.mul_(1 - factor).add_(var.detach() * (n / (n - 1).clamp_min(1)), alpha=factor)  # type: ignore[union-attr]
    y = (x - mean) * torch.rsqrt(var + bn.eps)  # (T, C)
    return y * bn.weight + bn.bias if bn.affine else y


@dataclass
class Dist:
    """This process's place in a multi-process run (``world`` >= 2)."""

    rank: int
    world: int
    device: torch.device
    expert_parallel: bool = False
    group: Any = None  # None: the default (world) group
    _ddp_ignore: list[str] = field(default_factory=list)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ objects
    def broadcast(self, obj: T | None = None) -> T:
        """Rank 0's ``obj`` on every rank (pickled)."""
        box = [obj]
        tdist.broadcast_object_list(box, src=0, group=self.group, device=self._obj_device())
        return box[0]  # type: ignore[return-value]

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 only and return its result on every rank; an error there is
        raised on rank 0 as itself and on the others as :class:`RankError` (same message)."""
        if not self.is_main:
            ok, value = self.broadcast(None)
            if ok:
                return value
            raise RankError(value)
        try:
            result = fn()
        except BaseException as exc:
            self.broadcast((False, f"{exc}"))
            raise
        try:
            pickle.dumps(result)
        except Exception:  # noqa: BLE001 - unpicklable: a bug, say so everywhere
            self.broadcast((False, "rank 0 could not share its result"))
            raise
        self.broadcast((True, result))
        return result

    def check_shared_store(self, store: Any, timeout_s: float = CHECK_TIMEOUT_S) -> None:
        """Before any training: rank 0 writes a marker object, every other rank must read it
        back from its own store path (the hosts mount one directory). Raises
        :class:`~expert_store.StoreNotSharedError` on every rank when any rank cannot."""
        token = self.on_main(lambda: write_share_marker(store))
        error: StoreNotSharedError | None = None
        if not self.is_main:
            try:
                check_share_marker(store, token, timeout_s=timeout_s)
            except StoreNotSharedError as exc:
                error = exc
        if self.any(error is not None):
            raise error or StoreNotSharedError(
                "the store directory is not shared between hosts: another rank cannot read the marker object rank 0 wrote "
                f"({token[:12]}); mount the same directory at the store path on every host")

    def _obj_device(self) -> torch.device | None:
        return self.device if self.device.type == "cuda" else None

    # ------------------------------------------------------------------- tensors
    def sum_(self, t: Tensor) -> Tensor:
        """In-place sum over ranks (integer and float tensors alike)."""
        tdist.all_reduce(t, group=self.group)
        return t

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is True on any."""
        t = torch.tensor([1 if flag else 0], device=self.device)
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX, group=self.group)
        return bool(t.item())

    def barrier(self) -> None:
        tdist.barrier(group=self.group)

    def share(self, n: int) -> slice:
        """This rank's rows of ``n``: the r-th of ``P`` contiguous, nearly equal parts."""
        bounds = np.linspace(0, n, self.world + 1).round().astype(int) if n % self.world else np.arange(self.world + 1) * (n // self.world)
        return slice(int(bounds[self.rank]), int(bounds[self.rank + 1]))

    def shard(self, batch: Tensor) -> Tensor:
        """Rows ``[r*B/P, (r+1)*B/P)`` of a global batch (B, ...)."""
        return batch[self.share(batch.shape[0])]

    @contextmanager
    def sharded(self) -> Iterator[None]:
        """Inside, every rank runs its own tokens: the query BatchNorm syncs, sliced experts gather."""
        _SHARDED.append(self.group if self.group is not None else tdist.group.WORLD)
        try:
            yield
        finally:
            _SHARDED.pop()

    # ------------------------------------------------------------------ training
    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` under DDP for its trainable dense parameters (buffers, e.g. the expert
        tables, are neither broadcast nor synchronised: every rank computes them the same way)."""
        if not any(p.requires_grad for p in model.parameters()):
            return model
        model._ddp_params_and_buffers_to_ignore = [n for n, _ in model.named_buffers()]  # type: ignore[assignment]
        ids = [self.device.index] if self.device.type == "cuda" else None
        with warnings.catch_warnings():  # broadcast_buffers=False is still the way to keep buffers rank-local at init
            warnings.simplefilter("ignore", FutureWarning)
            return nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False, process_group=self.group)

    def merge_row_grads(self, layers: list[Any]) -> None:
        """Make every rank's pending expert-row gradients the mean over ranks.

        Data parallel: the (row ids (R_r,), grad_u, grad_v (R_r, d)) of every rank are
        gathered, summed per row and divided by P. Expert parallel: each rank's gradients
        already hold every token's share (tokens are gathered in the layer): only / P."""
        for layer in layers:
            popped = layer.grads.pop()
            if self.expert_parallel:
                if popped is not None:
                    rows, gu, gv = popped
                    layer.grads.add(rows, gu / self.world, gv / self.world)
                continue
            d = layer.expert_u.shape[1]
            if popped is None:
                rows = torch.zeros(0, dtype=torch.long, device=self.device)
                both = layer.expert_u.new_zeros(0, 2 * d)
            else:
                rows, gu, gv = popped
                both = torch.cat([gu, gv], dim=1)  # (R, 2d)
            all_rows = gather_rows(rows, self.world, self.group)
            all_both = gather_rows(both, self.world, self.group)
            if all_rows.numel() == 0:
                continue
            uniq, inv = torch.unique(all_rows, return_inverse=True)  # (U,)
            merged = all_both.new_zeros(uniq.numel(), 2 * d).index_add_(0, inv, all_both).div_(self.world)  # (U, 2d)
            layer.grads.add(uniq, merged[:, :d].contiguous(), merged[:, d:].contiguous())

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate_loss(self, model: nn.Module, blocks: np.ndarray, batch_size: int = 8, max_batches: int | None = None) -> float:
        """:func:`lifelong.evaluate.evaluate_loss` with each batch's rows split across ranks."""
        from .errors import DataError

        if len(blocks) == 0:
            raise DataError("no evaluation blocks")
        was_training = model.training
        model.eval()
        pad = model.config.pad_id  # type: ignore[union-attr]
        total = torch.zeros(2, dtype=torch.float64, device=self.device)  # (loss sum, tokens)
        try:
            for b, i in enumerate(range(0, len(blocks), batch_size)):
                if max_batches is not None and b >= max_batches:
                    break
                part = blocks[i : i + batch_size][self.share(len(blocks[i : i + batch_size]))]
                if len(part) == 0 and not self.expert_parallel:
                    continue
                batch = torch.from_numpy(np.ascontiguousarray(part)).long().to(self.device)  # (b, L+1)
                with self.sharded():
                    logits, _ = model(batch[:, :-1])
                targets = batch[:, 1:].reshape(-1)
                total[0] += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets, ignore_index=pad, reduction="sum"))
                total[1] += int((targets != pad).sum())
        finally:
            model.train(was_training)
        self.sum_(total)
        if total[1] == 0:
            raise DataError("evaluation blocks hold only padding")
        return float(total[0] / total[1])

    def sum_recordings(self, recs: dict[str, Any]) -> None:
        """Sum recorded usage / counts of every rank (after a split evaluation)."""
        for rec in recs.values():
            for t in (rec.usage, rec.counts):
                if t is not None:
                    self.sum_(t)

    def expert_usage(self, model: Any, blocks: np.ndarray, batch_size: int = 8, max_batches: int | None = 8,
                     counts: dict[str, Tensor] | None = None) -> dict[str, dict[str, float]]:
        """:func:`lifelong.evaluate.expert_usage` on a split evaluation."""
        import math

        from .evaluate import kl_to_uniform
        from .peer import recording

        with recording(model.peer_layers(), usage=True) as recs:
            self.evaluate_loss(model, blocks, batch_size, max_batches)
        self.sum_recordings(recs)
        out = {}
        for name, rec in recs.items():
            u = rec.usage
            if counts is not None:
                counts[name] = u.cpu()
            kl = kl_to_uniform(u)
            out[name] = {"used_share": float((u > 0).double().mean()), "kl_uniform": kl if math.isfinite(kl) else None,
                         "experts": int(u.numel())}
        return out

    # ------------------------------------------------------------ expert parallel
    @property
    def expert_slice(self) -> tuple[int, int, Any] | None:
        """What :func:`lifelong.checkpoint.checkout_model` takes to read only this rank's columns."""
        return (self.rank, self.world, self.group) if self.expert_parallel else None

    def slice_experts(self, model: Any) -> None:
        """Keep only this rank's columns ``[r*d/P, (r+1)*d/P)`` of every expert table."""
        for layer in model.peer_layers().values():
            layer.slice_experts(self.rank, self.world, self.group)

    def write_slices(self, store: Any, model: Any, origin: Any = None) -> dict[tuple[str, int, int], list[Any]]:
        """Every rank writes its columns of the shards to commit as objects
        (:func:`lifelong.checkpoint.write_slices`); returns every rank's parts per row range,
        in column order (only their hashes travel: no tensor leaves its rank). A rank that
        could not write (disk full) fails every rank: rank 0 with the error, the others with
        :class:`RankError`."""
        from .checkpoint import write_slices

        try:
            mine, error = write_slices(store, model, origin), None
        except Exception as exc:  # noqa: BLE001 - every rank must hear of it, or the others would wait forever
            mine, error = {}, exc
        box: list[Any] = [None] * self.world
        tdist.all_gather_object(box, (mine, None if error is None else f"{error}"), group=self.group)
        failed = [(r, msg) for r, (_, msg) in enumerate(box) if msg is not None]
        if failed:
            if error is not None and self.is_main:
                raise error
            rank, msg = failed[0]
            raise (DistributedError if self.is_main else RankError)(f"rank {rank} could not write its columns of the expert "
                                                                      f"tables: {msg}")
        merged: dict[tuple[str, int, int], list[Any]] = {}
        for parts, _ in box:
            for key, part in parts.items():
                merged.setdefault(key, []).append(part)
        return {key: sorted(parts, key=lambda p: p.col_start) for key, parts in merged.items()}


def gather_rows(t: Tensor, world: int, group: Any = None) -> Tensor:
    """Concatenate every rank's ``t`` (R_r, ...) along dim 0 (R_r may differ)."""
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    tdist.all_gather(sizes, n, group=group)
    counts = [int(s) for s in sizes]
    biggest = max(counts)
    padded = t.new_zeros(biggest, *t.shape[1:])
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(world)]
    tdist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[:c] for p, c in zip(parts, counts)])


# --------------------------------------------------------------------------- set-up
def check_layout(world: int, batch_size: int, d_model: int | None, expert_parallel: bool) -> None:
    """Bad input before any training starts: one line each."""
    if world < 1:
        raise ConfigError(f"invalid --nproc: must be at least 1, got {world}")
    if batch_size % world:
        raise ConfigError(f"batch size {batch_size} is not divisible by the {world} processes: each rank takes an equal share "
                          f"of every global batch (pick --batch-size a multiple of {world})")
    if expert_parallel and d_model is not None and d_model % world:
        raise ConfigError(f"--expert-parallel splits d_model across ranks, but d_model {d_model} is not divisible by the "
                          f"{world} processes")


def init_from_env(device: str | torch.device | None = None, *, expert_parallel: bool = False) -> Dist | None:
    """Join the process group ``torchrun`` describes (RANK, WORLD_SIZE, MASTER_ADDR, ...).

    None when not launched with more than one process. gloo on CPU, NCCL when the device is
    a GPU; collectives wait at most ``$LIFELONG_DIST_TIMEOUT`` seconds (default 1800) for a peer.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        if torch.cuda.device_count() < int(os.environ.get("LOCAL_WORLD_SIZE", world)):
            raise DistributedError(f"{os.environ.get('LOCAL_WORLD_SIZE', world)} processes on this host but "
                                   f"{torch.cuda.device_count()} GPUs: use --device cpu or fewer processes")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    timeout = timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "1800")))
    if not tdist.is_initialized():
        tdist.init_process_group(backend, timeout=timeout)
    return Dist(rank=rank, world=world, device=dev, expert_parallel=expert_parallel)


def shutdown() -> None:
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


def relaunch(argv: list[str], nproc: int) -> int:
    """Become ``torchrun`` running ``lifelong argv`` on ``nproc`` local processes (exec:
    signals then reach torchrun, which stops every rank). Does not return."""
    sys.stdout.flush()
    sys.stderr.flush()
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))  # the cores shared out
    os.execve(sys.executable, launch_args(argv, nproc), env)
    return 1  # pragma: no cover


def launch_args(argv: list[str], nproc: int) -> list[str]:
    """The ``python -m torch.distributed.run`` command that reruns ``lifelong argv`` on
    ``nproc`` local processes (``--nproc`` removed from ``argv``)."""
    rest: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            rest.append(a)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node", str(nproc),
            "--max-restarts", "0", "-m", "lifelong", *rest]
