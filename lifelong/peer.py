"""The PEER layer: product-key retrieval over a pool of singleton experts (He 2024).

Notation: ``T`` tokens, ``h`` heads, ``k`` experts per head, ``S = h * k`` slots per token,
``d`` = d_model, ``dk`` = d_key, ``n1`` x ``n2`` the expert grid, ``N = n1 * n2`` experts.
Expert ``i * n2 + j`` sits at row ``i`` and column ``j``; its full key is ``[C1_i ; C2_j]``.

Efficiency (DESIGN.md section 4):

- :class:`ExpertMix` never keeps a ``(T, h, k, d)`` gathered weight tensor: the value side is
  a fused gather-sum (``embedding_bag`` with ``per_sample_weights``), the ``u`` side is
  gathered in small chunks into one reused workspace, and backward recomputes instead of
  storing. Only ``(T, S)`` tensors are saved for backward.
- The expert tables ``u`` and ``v`` are buffers, not autograd leaves. Backward aggregates
  gradients only for the touched rows of the *trainable* range (ids >= ``trainable_start``)
  and hands them to :class:`ExpertGrads`; :class:`lifelong.optim.RowAdam` applies them.
  Frozen experts therefore cost no gradient, no optimizer state and no optimizer work, and
  are never written (bit-identical).
- Growth appends rows at the end of the grid, so the newest shard is always the highest ids
  and "trainable" is one contiguous id range.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import PEERConfig
from .errors import ConfigError

__all__ = ["PEERLayer", "ExpertMix", "ExpertGrads", "product_key_topk"]

_CHUNK_TOKENS = 32  # tokens per gather chunk: (32, S, d) float32 is 4 MiB at S=128, d=256


class _SubKeyScores(torch.autograd.Function):
    """Scores of selected sub-keys, s[t, s] = q[t] . keys[idx[t, s]], given their values.

    The values come from the selection GEMM; backward is sparse: only the selected keys get
    gradient, so no dense (T, n) score gradient and no backward GEMM over the codebook.
    q: (T, dh); keys: (n, dh); idx, values: (T, c).
    """

    @staticmethod
    def forward(ctx, q, keys, idx, values):  # type: ignore[override]
        ctx.save_for_backward(q, keys, idx)
        return values

    @staticmethod
    def backward(ctx, ds):  # type: ignore[override]
        q, keys, idx = ctx.saved_tensors
        ds = ds.contiguous()
        dq = F.embedding_bag(idx, keys, mode="sum", per_sample_weights=ds) if ctx.needs_input_grad[0] else None
        dkeys = None
        if ctx.needs_input_grad[1]:
            dkeys = torch.zeros_like(keys)
            groups = _group_rows(idx, 0)
            dkeys[groups[0]] = _row_sums(groups, ds, q)  # (R, dh): only selected keys
        return dq, dkeys, None, None


def _subkey_topk(q: Tensor, keys: Tensor, c: int) -> tuple[Tensor, Tensor]:
    """Top-c sub-key scores (differentiable, sparse backward) and indices. q: (..., dh); keys: (n, dh)."""
    lead = q.shape[:-1]
    q2 = q.reshape(-1, q.shape[-1])  # (M, dh)
    with torch.no_grad():
        values, idx = (q2 @ keys.t()).topk(c, dim=-1)  # (M, c)
    if q2.requires_grad or keys.requires_grad:
        values = _SubKeyScores.apply(q2, keys, idx, values)
    return values.view(*lead, c), idx.view(*lead, c)


def product_key_topk(
    q: Tensor, row_keys: Tensor, col_keys: Tensor, k: int, candidates: int | None = None
) -> tuple[Tensor, Tensor]:
    """Exact top-k of ``q . [C1_i ; C2_j]`` over all ``n1 * n2`` pairs via product keys.

    q: (..., dk); row_keys: (n1, dk/2); col_keys: (n2, dk/2).
    Returns scores (..., k) (differentiable) and expert ids (..., k) = ``i * n2 + j``.
    Exact because the top-k pairs can only use rows in the top-k of ``q1 . C1`` and columns in
    the top-k of ``q2 . C2``. With ``candidates`` < k each side keeps fewer: approximate.
    """
    n1, n2 = row_keys.shape[0], col_keys.shape[0]
    c = k if candidates is None else candidates
    q1, q2 = q.chunk(2, dim=-1)  # (..., dk/2) each
    v1, i1 = _subkey_topk(q1, row_keys, min(c, n1))  # (..., c1)
    v2, i2 = _subkey_topk(q2, col_keys, min(c, n2))  # (..., c2)
    c2 = v2.shape[-1]
    pairs = (v1.unsqueeze(-1) + v2.unsqueeze(-2)).flatten(-2)  # (..., c1 * c2)
    scores, flat = pairs.topk(k, dim=-1)  # (..., k)
    rows = i1.gather(-1, torch.div(flat, c2, rounding_mode="floor"))  # (..., k)
    cols = i2.gather(-1, flat % c2)  # (..., k)
    return scores, rows * n2 + cols


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


def _group_rows(ids: Tensor, start: int) -> tuple[Tensor, Tensor, Tensor] | None:
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


def _row_sums(groups: tuple[Tensor, Tensor, Tensor], coef: Tensor, x: Tensor) -> Tensor:
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
            groups = _group_rows(ids, sink.start)  # touched trainable rows, once for u and v
            if groups is not None:
                sink.add(groups[0], _row_sums(groups, da, x), _row_sums(groups, g * z, dy))  # (R,), (R, d) x2
        return dx, dg, None, None, None, None, None, None


@dataclass
class Shard:
    """A block of rows [row_start, row_end) of the grid: the unit of growth and storage."""

    row_start: int
    row_end: int
    frozen: bool = False
    store_id: int | None = None  # shard id in the expert store, once committed unchanged


class PEERLayer(nn.Module):
    """Parameter Efficient Expert Retrieval: a drop-in replacement for an FFN.

    Trainable state: the query projection and BatchNorm (parameters), the trainable rows of
    the row codebook ``row_keys`` and, until frozen, the column codebook ``col_keys``
    (parameters), and the trainable id range of the expert tables (buffers updated by
    :class:`lifelong.optim.RowAdam` from :attr:`grads`). Frozen rows live in buffers.
    """

    def __init__(self, config: PEERConfig, *, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.config = c = dataclasses.replace(config)  # own copy: growth changes n_rows
        half = c.d_key // 2
        self.query = nn.Linear(c.d_model, c.heads * c.d_key, bias=False, device=device, dtype=dtype)
        self.query_norm = (
            nn.BatchNorm1d(c.heads * c.d_key, device=device, dtype=dtype) if c.query_batchnorm else nn.Identity()
        )
        self.register_buffer("frozen_row_keys", torch.empty(0, half, device=device, dtype=dtype))
        self.row_keys = nn.Parameter(self._init_keys(c.n_rows, device, dtype))  # (n1 - frozen, dk/2)
        self.col_keys = nn.Parameter(self._init_keys(c.n_cols, device, dtype))  # (n2, dk/2)
        u, v = self._init_experts(c.n_rows * c.n_cols, device, dtype)
        self.register_buffer("expert_u", u)  # (N, d)
        self.register_buffer("expert_v", v)  # (N, d)
        self.shards: list[Shard] = [Shard(0, c.n_rows)]
        self.grads = ExpertGrads()
        self.query_frozen = False
        self.capture: list[Tensor] | None = None  # set to a list to record queries (audit)
        self.usage: Tensor | None = None  # set to zeros(N) to accumulate router scores

    # ----------------------------------------------------------------------------- init
    def _init_keys(self, rows: int, device, dtype) -> Tensor:
        half = self.config.d_key // 2
        return torch.randn(rows, half, device=device, dtype=dtype).div_(math.sqrt(half))

    def _init_experts(self, n: int, device, dtype) -> tuple[Tensor, Tensor]:
        c = self.config
        u = torch.randn(n, c.d_model, device=device, dtype=dtype).div_(math.sqrt(c.d_model))  # in place: one copy
        v = torch.randn(n, c.d_model, device=device, dtype=dtype).div_(math.sqrt(c.heads * c.top_k))
        return u, v

    # ------------------------------------------------------------------------ geometry
    @property
    def n_rows(self) -> int:
        return self.frozen_row_keys.shape[0] + self.row_keys.shape[0]

    @property
    def n_cols(self) -> int:
        return self.col_keys.shape[0]

    @property
    def num_experts(self) -> int:
        return self.expert_u.shape[0]

    @property
    def frozen_rows(self) -> int:
        return self.frozen_row_keys.shape[0]

    @property
    def trainable_start(self) -> int:
        """First trainable expert id; experts below it are frozen."""
        return self.frozen_rows * self.n_cols

    def all_row_keys(self) -> Tensor:
        """C1: (n1, dk/2) = frozen rows followed by trainable rows."""
        if self.frozen_rows == 0:
            return self.row_keys
        return torch.cat([self.frozen_row_keys, self.row_keys], dim=0)

    def full_keys(self, row_start: int = 0, row_end: int | None = None) -> Tensor:
        """Materialised full keys [C1_i ; C2_j] for rows [row_start, row_end): ((rows * n2), dk)."""
        c1 = self.all_row_keys().detach()[row_start:row_end]  # (r, dk/2)
        c2 = self.col_keys.detach()  # (n2, dk/2)
        r, n2 = c1.shape[0], c2.shape[0]
        return torch.cat([c1[:, None, :].expand(r, n2, -1), c2[None, :, :].expand(r, n2, -1)], dim=-1).reshape(r * n2, -1)

    # ------------------------------------------------------------------------- forward
    def queries(self, x: Tensor) -> Tensor:
        """x: (T, d) -> q: (T, h, dk), after the query BatchNorm."""
        c = self.config
        return self.query_norm(self.query(x)).view(-1, c.heads, c.d_key)

    def retrieve(self, q: Tensor, candidates: int | None = None) -> tuple[Tensor, Tensor]:
        """q: (T, h, dk) -> scores (T, h, k), expert ids (T, h, k)."""
        cand = self.config.candidates if candidates is None else candidates
        return product_key_topk(q, self.all_row_keys(), self.col_keys, self.config.top_k, cand)

    def forward(self, x: Tensor) -> Tensor:
        c = self.config
        if x.shape[-1] != c.d_model:
            raise ConfigError(f"PEER layer expects d_model={c.d_model} inputs, got last dimension {x.shape[-1]}")
        shape = x.shape
        x2 = x.reshape(-1, c.d_model)  # (T, d)
        q = self.queries(x2)  # (T, h, dk)
        if self.capture is not None:
            self.capture.append(q.detach())
        scores, ids = self.retrieve(q)  # (T, h, k)
        g = scores.softmax(-1) if c.score == "softmax" else scores.sigmoid()  # (T, h, k)
        if self.usage is not None:
            self.usage.index_add_(0, ids.reshape(-1), g.detach().reshape(-1).to(self.usage.dtype))
        train_experts = torch.is_grad_enabled() and self.training and self.trainable_start < self.num_experts
        self.grads.start = self.trainable_start
        anchor = x2.new_empty(0).requires_grad_() if train_experts else None
        y = ExpertMix.apply(
            x2.contiguous(),
            g.reshape(x2.shape[0], -1),  # (T, S)
            ids.reshape(x2.shape[0], -1),  # (T, S)
            self.expert_u,
            self.expert_v,
            c.activation,
            self.grads if train_experts else None,
            anchor,
        )
        return y.view(shape)

    # ------------------------------------------------------------------ growth/freezing
    @torch.no_grad()
    def grow(self, rows: int, init_keys: Tensor | None = None) -> Shard:
        """Add ``rows`` rows (a new shard): their row keys and ``rows * n2`` new experts.

        Existing expert ids never change; the new ids are ``[n1 * n2, (n1 + rows) * n2)``.
        ``init_keys`` (rows, dk/2) seeds the new row keys (e.g. from new-domain queries).
        """
        if not isinstance(rows, int) or rows <= 0:
            raise ConfigError(f"invalid growth: 'rows' must be a positive integer, got {rows!r}")
        half = self.config.d_key // 2
        ref = self.expert_u
        if init_keys is None:
            new_keys = self._init_keys(rows, ref.device, ref.dtype)
        else:
            if tuple(init_keys.shape) != (rows, half):
                raise ConfigError(f"invalid growth: 'init_keys' must have shape ({rows}, {half}), got {tuple(init_keys.shape)}")
            new_keys = init_keys.to(ref.device, ref.dtype)
        u, v = self._init_experts(rows * self.n_cols, ref.device, ref.dtype)
        start = self.n_rows
        self.row_keys = nn.Parameter(torch.cat([self.row_keys.detach(), new_keys], dim=0))
        self.expert_u = torch.cat([self.expert_u, u], dim=0)
        self.expert_v = torch.cat([self.expert_v, v], dim=0)
        self.config.n_rows = self.n_rows
        self.grads.clear()
        shard = Shard(start, start + rows)
        self.shards.append(shard)
        return shard

    @torch.no_grad()
    def freeze(self) -> None:
        """Make every current expert and key non-trainable. Frozen tensors are never written again."""
        self.frozen_row_keys = torch.cat([self.frozen_row_keys, self.row_keys.detach()], dim=0)
        self.row_keys = nn.Parameter(self.row_keys.detach()[:0].clone())
        self.freeze_col_keys()
        for shard in self.shards:
            shard.frozen = True
        self.grads.clear()

    @torch.no_grad()
    def unfreeze(self) -> None:
        """Make every expert and key trainable again (the ``full`` fine-tuning policy)."""
        self.row_keys = nn.Parameter(self.all_row_keys().detach().clone())
        self.frozen_row_keys = self.frozen_row_keys[:0]
        self.col_keys.requires_grad_(True)
        self.freeze_query(False)
        for shard in self.shards:
            shard.frozen = False
        self.grads.clear()

    def freeze_query(self, frozen: bool = True) -> None:
        """Freeze the query projection and BatchNorm (its statistics stay in eval mode)."""
        self.query_frozen = frozen
        for p in list(self.query.parameters()) + list(self.query_norm.parameters()):
            p.requires_grad_(not frozen)
        self.train(self.training)

    def train(self, mode: bool = True) -> PEERLayer:
        super().train(mode)
        if self.query_frozen:
            self.query_norm.eval()  # frozen BatchNorm statistics are never updated
        return self

    def freeze_col_keys(self) -> None:
        """Freeze C2 (old experts' keys depend on it); done by :meth:`freeze`."""
        self.col_keys.requires_grad_(False)

    def load_tables(self, row_keys: Tensor, frozen_rows: int, u: Tensor, v: Tensor, shards: list[Shard]) -> None:
        """Replace the grid (used when checking a version out of the store)."""
        n1 = row_keys.shape[0]
        if u.shape != (n1 * self.n_cols, self.config.d_model) or v.shape != u.shape:
            raise ConfigError(f"expert tables of shape {tuple(u.shape)} do not fit a {n1} x {self.n_cols} grid")
        self.frozen_row_keys = row_keys[:frozen_rows].detach()
        self.row_keys = nn.Parameter(row_keys[frozen_rows:].detach().clone())
        self.expert_u, self.expert_v = u, v
        self.shards = shards
        self.config.n_rows = n1
        self.grads.clear()

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"d_model={c.d_model}, heads={c.heads}, top_k={c.top_k}, d_key={c.d_key}, "
            f"grid={self.n_rows}x{self.n_cols} ({self.num_experts} experts, {self.frozen_rows} rows frozen)"
        )
