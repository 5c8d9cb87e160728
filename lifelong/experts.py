"""The expert side of a PEER layer: y = sum_s g * act(u . x) * v, without gathered weights.

Notation as in :mod:`lifelong.peer`: ``T`` tokens, ``S = h * k`` slots per token, ``d`` =
d_model, ``N`` experts.

- :class:`ExpertMix` never keeps a ``(T, S, d)`` gathered weight tensor: the value side is
  a fused gather-sum (``embedding_bag`` with ``per_sample_weights``), the ``u`` side is a
  gathered dot product (one ``torch.compile``d loop for large calls, else chunked into one
  reused workspace) recomputed in backward. Only ``(T, S)`` tensors are saved for backward.
- The expert tables are buffers, not autograd leaves: backward aggregates gradients only for
  the touched rows of the trainable id range and hands them to :class:`ExpertGrads`, which
  :class:`lifelong.optim.RowAdam` applies.
- Expert parallel (:class:`ExpertMixSliced`): each of P ranks holds columns ``[r*d/P,
  (r+1)*d/P)`` of ``u`` and ``v`` (the value split of "Memory Layers at Scale"); partial
  ``u . x`` are all-reduced as (T, S) scalars, each rank mixes its slice of ``v``, the output
  slices are all-gathered along d. Backward mirrors it; row gradients stay sliced.
"""

from __future__ import annotations

import math
import os
import warnings

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ExpertMix", "ExpertMixSliced", "ExpertSlice", "ExpertGrads", "group_rows", "row_sums"]

_CHUNK_TOKENS = 32  # tokens per gather chunk: (32, S, d) float32 is 4 MiB at S=128, d=256


def _gathered_dot_eager(table: Tensor, ids: Tensor, x: Tensor) -> Tensor:
    """Chunked gather into one reused (chunk, S, d) workspace, then a batched dot."""
    T, S = ids.shape
    d = table.shape[1]
    out = x.new_empty(T, S)
    chunk = min(_CHUNK_TOKENS, T)
    work = table.new_empty(chunk, S, d)  # (c, S, d), reused for every chunk
    for t0 in range(0, T, chunk):
        t1 = min(t0 + chunk, T)
        buf = work[: t1 - t0]
        torch.index_select(table, 0, ids[t0:t1].reshape(-1), out=buf.view(-1, d))
        out[t0:t1] = torch.linalg.vecdot(buf, x[t0:t1].unsqueeze(1))  # (c, S)
    return out


def _gathered_dot_fused(table: Tensor, ids: Tensor, x: Tensor) -> Tensor:
    # Compiled by inductor into one loop that reads each gathered row once: no (T, S, d) tensor.
    return (table[ids] * x[:, None, :]).sum(-1)


_FUSED: dict[str, object] = {"fn": None, "failed": False}
_FUSED_MIN_ELEMENTS = 1 << 24  # below this the eager path is as fast and compiling is not worth it


def _gathered_dot(table: Tensor, ids: Tensor, x: Tensor) -> Tensor:
    """out[t, s] = table[ids[t, s]] . x[t]. table: (N, d); ids: (T, S); x: (T, d) -> (T, S).

    Large calls use a ``torch.compile``d fused kernel (set ``LIFELONG_COMPILE=0`` to disable;
    any compile failure falls back to eager for the rest of the process). The eager path's
    peak extra memory is one (chunk, S, d) workspace.
    """
    if (
        ids.numel() * table.shape[1] >= _FUSED_MIN_ELEMENTS
        and not _FUSED["failed"]
        and os.environ.get("LIFELONG_COMPILE", "1") != "0"
    ):
        try:
            if _FUSED["fn"] is None:
                _FUSED["fn"] = torch.compile(_gathered_dot_fused, dynamic=True)
            return _FUSED["fn"](table, ids, x)  # type: ignore[operator]
        except Exception as exc:  # no C++ compiler, unsupported platform, ...
            warnings.warn(f"torch.compile of the PEER gather-dot failed ({exc!r}); using the eager path")
            _FUSED["failed"] = True
    return _gathered_dot_eager(table, ids, x)


def group_rows(ids: Tensor, start: int) -> tuple[Tensor, Tensor, Tensor] | None:
    """Group the (T, S) slots by expert id, keeping ids >= start.

    Returns (rows (R,), offsets (R,), src (M,)): the unique ids, where each one's run starts in
    ``src``, and ``src`` = flat slot positions sorted by id. None if no id is >= start.
    """
    flat = ids.reshape(-1)  # (T*S,)
    sel = None
    if start > 0:
        sel = (flat >= start).nonzero().squeeze(1)  # (M,)
        if sel.numel() == 0:
            return None
        flat = flat[sel]
    sorted_ids, perm = torch.sort(flat)  # (M,)
    rows, counts = torch.unique_consecutive(sorted_ids, return_counts=True)  # (R,)
    offsets = torch.zeros_like(counts)
    offsets[1:] = counts.cumsum(0)[:-1]
    src = perm if sel is None else sel[perm]  # positions in the flat (T*S,) view
    return rows, offsets, src


def row_sums(groups: tuple[Tensor, Tensor, Tensor], coef: Tensor, x: Tensor) -> Tensor:
    """For each grouped id r: sum over its slots (t, s) of coef[t, s] * x[t] -> (R, d).

    coef: (T, S); x: (T, d). One fused gather-sum (embedding_bag over x): no (T*S, d) tensor.
    """
    _, offsets, src = groups
    tokens = torch.div(src, coef.shape[1], rounding_mode="floor")  # (M,)
    return F.embedding_bag(tokens, x, offsets, mode="sum", per_sample_weights=coef.reshape(-1)[src])


class ExpertGrads:
    """Collects row gradients of the trainable expert range between optimizer steps."""

    def __init__(self) -> None:
        self.start = 0  # first trainable expert id
        self.entries: list[tuple[Tensor, Tensor, Tensor]] = []  # (rows, grad_u, grad_v)

    def add(self, rows: Tensor, grad_u: Tensor, grad_v: Tensor) -> None:
        self.entries.append((rows, grad_u, grad_v))

    def pop(self) -> tuple[Tensor, Tensor, Tensor] | None:
        """The summed gradients since the last pop: (unique rows, grad_u, grad_v)."""
        entries, self.entries = self.entries, []
        if not entries:
            return None
        if len(entries) == 1:
            return entries[0]
        rows = torch.cat([e[0] for e in entries])
        uniq, inv = torch.unique(rows, return_inverse=True)
        gu = entries[0][1].new_zeros(len(uniq), entries[0][1].shape[1])
        gv = torch.zeros_like(gu)
        gu.index_add_(0, inv, torch.cat([e[1] for e in entries]))
        gv.index_add_(0, inv, torch.cat([e[2] for e in entries]))
        return uniq, gu, gv

    def clear(self) -> None:
        self.entries = []


def _act(a: Tensor, name: str) -> Tensor:
    return F.gelu(a) if name == "gelu" else F.relu(a)


def _act_grad(a: Tensor, name: str) -> Tensor:
    if name == "relu":
        return (a > 0).to(a.dtype)
    cdf = 0.5 * (1.0 + torch.erf(a * (1.0 / math.sqrt(2.0))))
    pdf = torch.exp(-0.5 * a * a) * (1.0 / math.sqrt(2.0 * math.pi))
    return cdf + a * pdf


class ExpertMix(torch.autograd.Function):
    """y[t] = sum_s g[t, s] * act(u[ids[t, s]] . x[t]) * v[ids[t, s]].

    x: (T, d); g: (T, S); ids: (T, S); u, v: (N, d) -> y: (T, d).
    Saves only (T, S) tensors; expert-table gradients go to ``sink`` (rows >= sink.start).
    """

    @staticmethod
    def forward(ctx, x, g, ids, u, v, activation: str, sink: ExpertGrads | None, anchor):  # type: ignore[override]
        a = _gathered_dot(u, ids, x)  # (T, S) pre-activations u . x
        w = g * _act(a, activation)  # (T, S) weight of each v row
        y = F.embedding_bag(ids, v, mode="sum", per_sample_weights=w)  # (T, d) fused gather-sum
        ctx.save_for_backward(x, g, ids, a, u, v)
        ctx.activation = activation
        ctx.sink = sink
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x, g, ids, a, u, v = ctx.saved_tensors
        dy = dy.contiguous()
        z = _act(a, ctx.activation)  # (T, S)
        b = _gathered_dot(v, ids, dy)  # (T, S) = v[ids] . dy
        dg = b * z  # (T, S)
        da = b * g * _act_grad(a, ctx.activation)  # (T, S)
        dx = F.embedding_bag(ids, u, mode="sum", per_sample_weights=da)  # (T, d) fused gather-sum
        sink: ExpertGrads | None = ctx.sink
        if sink is not None:
            groups = group_rows(ids, sink.start)  # touched trainable rows, once for u and v
            if groups is not None:
                sink.add(groups[0], row_sums(groups, da, x), row_sums(groups, g * z, dy))  # (R,), (R, d) x2
        return dx, dg, None, None, None, None, None, None


@dataclass
class ExpertSlice:
    """Columns ``[lo, hi)`` = ``[rank*d/P, (rank+1)*d/P)`` of the expert tables held by this rank."""

    rank: int
    world: int
    d_model: int
    group: Any = None  # None: the default process group

    @property
    def width(self) -> int:
        return self.d_model // self.world

    @property
    def lo(self) -> int:
        return self.rank * self.width

    @property
    def hi(self) -> int:
        return self.lo + self.width

    def take(self, table: Tensor) -> Tensor:
        """This rank's columns of a full (N, d) table, as its own contiguous tensor."""
        return table[:, self.lo : self.hi].contiguous()

    def sum_(self, t: Tensor) -> Tensor:
        tdist.all_reduce(t, group=self.group)
        return t

    def cat_columns(self, part: Tensor) -> Tensor:
        """Every rank's (T, d/P) slice side by side: (T, d)."""
        parts = [torch.empty_like(part) for _ in range(self.world)]
        tdist.all_gather(parts, part.contiguous(), group=self.group)
        return torch.cat(parts, dim=1)

    def square_means(self, gu: Tensor, gv: Tensor) -> Tensor:
        """(R, 2) mean over the whole d of squared row gradients, from this rank's slices."""
        s = torch.stack([gu.pow(2).sum(1), gv.pow(2).sum(1)], dim=1).float()  # (R, 2)
        return self.sum_(s) / self.d_model


def _gather_tokens(t: Tensor, sl: ExpertSlice) -> tuple[Tensor, list[int]]:
    """Every rank's tokens (T_r, ...) one after the other: (sum T_r, ...), and the T_r."""
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(sl.world)]
    tdist.all_gather(sizes, n, group=sl.group)
    counts = [int(c) for c in sizes]
    padded = t.new_zeros(max(counts), *t.shape[1:])
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(sl.world)]
    tdist.all_gather(parts, padded, group=sl.group)
    return torch.cat([p[:c] for p, c in zip(parts, counts)]), counts


def _own(t: Tensor, counts: list[int] | None, rank: int) -> Tensor:
    if counts is None:
        return t
    start = sum(counts[:rank])
    return t[start : start + counts[rank]]


class ExpertMixSliced(torch.autograd.Function):
    """:class:`ExpertMix` with ``u``, ``v`` (N, d/P) this rank's columns of the tables.

    ``sharded``: every rank passes its own tokens, which are gathered first (data and expert
    parallel together); otherwise every rank passes the same tokens. Returns this rank's
    tokens' full (T, d) output. Collectives: forward all-reduces (T, S) partial dots and
    all-gathers (T, d/P) output slices; backward the same for ``v . dy`` and ``dx``. Row
    gradients handed to ``sink`` are this rank's column slices, over every rank's tokens.
    """

    @staticmethod
    def forward(ctx, x, g, ids, u, v, activation: str, sink: ExpertGrads | None, anchor, sl: ExpertSlice,  # type: ignore[override]
                sharded: bool):
        counts = None
        if sharded:
            x, counts = _gather_tokens(x, sl)  # (T, d) of every rank
            g, _ = _gather_tokens(g, sl)  # (T, S)
            ids, _ = _gather_tokens(ids, sl)  # (T, S)
        xs = x[:, sl.lo : sl.hi].contiguous()  # (T, d/P)
        a = sl.sum_(_gathered_dot(u, ids, xs))  # (T, S) = u . x, from every rank's partial dot
        w = g * _act(a, activation)  # (T, S)
        y = sl.cat_columns(F.embedding_bag(ids, v, mode="sum", per_sample_weights=w))  # (T, d)
        ctx.save_for_backward(xs, g, ids, a, u, v)
        ctx.activation, ctx.sink, ctx.sl, ctx.counts = activation, sink, sl, counts
        return _own(y, counts, sl.rank)

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        xs, g, ids, a, u, v = ctx.saved_tensors
        sl: ExpertSlice = ctx.sl
        dy = dy.contiguous()
        if ctx.counts is not None:
            dy, _ = _gather_tokens(dy, sl)  # (T, d)
        dys = dy[:, sl.lo : sl.hi].contiguous()  # (T, d/P)
        z = _act(a, ctx.activation)  # (T, S)
        b = sl.sum_(_gathered_dot(v, ids, dys))  # (T, S) = v . dy
        dg = b * z  # (T, S)
        da = b * g * _act_grad(a, ctx.activation)  # (T, S)
        dx = sl.cat_columns(F.embedding_bag(ids, u, mode="sum", per_sample_weights=da))  # (T, d)
        sink: ExpertGrads | None = ctx.sink
        if sink is not None:
            groups = group_rows(ids, sink.start)
            if groups is not None:
                sink.add(groups[0], row_sums(groups, da, xs), row_sums(groups, g * z, dys))  # (R,), (R, d/P) x2
        return (_own(dx, ctx.counts, sl.rank), _own(dg, ctx.counts, sl.rank), None, None, None, None, None, None, None, None)
