"""The PEER layer: product-key retrieval over a pool of singleton experts (He 2024).

Notation: ``T`` tokens, ``h`` heads, ``k`` experts per head, ``S = h * k`` slots per token,
``d`` = d_model, ``dk`` = d_key, ``n1`` x ``n2`` the expert grid, ``N = n1 * n2`` experts.
Expert ``i * n2 + j`` sits at row ``i`` and column ``j``; its full key is ``[C1_i ; C2_j]``.

Efficiency (DESIGN.md section 4): retrieval is exact product-key top-k with a sparse
backward for the sub-key scores (only selected keys get gradient); the experts are mixed by
:class:`lifelong.experts.ExpertMix` without gathered weight tensors. The expert tables are
buffers: backward collects row gradients of the *trainable* id range only (ids >=
``trainable_start``) and :class:`lifelong.optim.RowAdam` applies them, so frozen experts
cost no gradient, no optimizer state and no optimizer work, and are never written
(bit-identical). Growth appends rows at the end of the grid, so the newest shard is always
the highest ids and "trainable" is one contiguous id range.

Nothing here knows about storage: :mod:`lifelong.checkpoint` maps row ranges to stored shards.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import PEERConfig
from .errors import ConfigError
from .experts import ExpertGrads, ExpertMix, ExpertMixSliced, ExpertSlice, group_rows, row_sums

__all__ = ["PEERLayer", "Shard", "Recording", "recording", "product_key_topk"]


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
            groups = group_rows(idx, 0)
            dkeys[groups[0]] = row_sums(groups, ds, q)  # (R, dh): only selected keys
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


@dataclass
class Shard:
    """A block of rows [row_start, row_end) of the grid: the unit of growth and storage."""

    row_start: int
    row_end: int
    frozen: bool = False


@dataclass
class Recording:
    """What a PEER layer records while :meth:`PEERLayer.record` is active."""

    queries: list[Tensor] | None = None  # one (T, h, dk) tensor per forward (after BatchNorm)
    usage: Tensor | None = None  # (N,) float64 router weight accumulated per expert
    counts: Tensor | None = None  # (N,) int64 times each expert was retrieved (token x head)


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
        # Query anchors: a sample of the queries (after BatchNorm, heads flattened) this layer
        # saw on the streams it was trained on; no text. Growth keeps new keys off them.
        self.register_buffer("anchors", torch.empty(0, c.d_key, device=device, dtype=dtype))  # (A, dk)
        # Background usage of the streams trained so far, the document frequency of sparse memory
        # finetuning with one head's top-k for one token as the document: per expert, in how
        # many such retrievals it was selected, and how many there were.
        self.register_buffer("background", torch.zeros(c.n_rows * c.n_cols, device=device))  # (N,)
        self.register_buffer("background_docs", torch.zeros((), device=device))
        self.shards: list[Shard] = [Shard(0, c.n_rows)]
        self.grads = ExpertGrads()
        self.query_frozen = False
        self.old_experts_open = False  # policy sparse with growth: frozen rows' experts may train
        self.visible_rows: int | None = None  # retrieval sees rows [0, visible_rows) only (a frozen branch)
        self._recording: Recording | None = None
        self.expert_slice: ExpertSlice | None = None  # set by slice_experts (expert parallel)

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
        """First trainable expert id; experts below it are frozen (all train when the old
        experts' rows are open, :meth:`open_old_experts`, while their keys stay frozen)."""
        return 0 if self.old_experts_open else self.frozen_rows * self.n_cols

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
        group = _sharded_group()
        if group is not None and isinstance(self.query_norm, nn.BatchNorm1d) and self.query_norm.training:
            return _sync_batch_norm(self.query(x), self.query_norm, group).view(-1, c.heads, c.d_key)  # global batch statistics
        return self.query_norm(self.query(x)).view(-1, c.heads, c.d_key)

    def retrieve(self, q: Tensor, candidates: int | None = None) -> tuple[Tensor, Tensor]:
        """q: (T, h, dk) -> scores (T, h, k), expert ids (T, h, k)."""
        cand = self.config.candidates if candidates is None else candidates
        return product_key_topk(q, self.all_row_keys()[: self.visible_rows], self.col_keys, self.config.top_k, cand)

    def forward(self, x: Tensor) -> Tensor:
        c = self.config
        if x.shape[-1] != c.d_model:
            raise ConfigError(f"PEER layer expects d_model={c.d_model} inputs, got last dimension {x.shape[-1]}")
        shape = x.shape
        x2 = x.reshape(-1, c.d_model)  # (T, d)
        q = self.queries(x2)  # (T, h, dk)
        scores, ids = self.retrieve(q)  # (T, h, k)
        g = scores.softmax(-1) if c.score == "softmax" else scores.sigmoid()  # (T, h, k)
        if self._recording is not None:
            self._record(self._recording, q, ids, g)
        train_experts = torch.is_grad_enabled() and self.training and self.trainable_start < self.num_experts
        self.grads.start = self.trainable_start
        anchor = x2.new_empty(0).requires_grad_() if train_experts else None
        if self.expert_slice is not None:
            y = ExpertMixSliced.apply(x2.contiguous(), g.reshape(x2.shape[0], -1), ids.reshape(x2.shape[0], -1), self.expert_u,
                                      self.expert_v, c.activation, self.grads if train_experts else None, anchor,
                                      self.expert_slice, _sharded_group() is not None)
            return y.view(shape)
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

    # ---------------------------------------------------------------------- recording
    @contextmanager
    def record(self, *, queries: bool = False, usage: bool = False, counts: bool = False) -> Iterator[Recording]:
        """Record this layer's queries, router usage and/or retrieval counts for the forwards
        run inside.

        ``usage`` accumulates each expert's router weight, ``counts`` how often it was
        retrieved, over the experts that exist on entry (PEER paper Table 2). The previous
        recording (if nested) is restored on exit.
        """
        dev = self.expert_u.device
        rec = Recording(
            queries=[] if queries else None,
            usage=torch.zeros(self.num_experts, dtype=torch.float64, device=dev) if usage else None,
            counts=torch.zeros(self.num_experts, dtype=torch.int64, device=dev) if counts else None,
        )
        saved, self._recording = self._recording, rec
        try:
            yield rec
        finally:
            self._recording = saved

    @torch.no_grad()
    def _record(self, rec: Recording, q: Tensor, ids: Tensor, g: Tensor) -> None:
        """q: (T, h, dk); ids, g: (T, h, k). Experts grown since the recording began are not counted."""
        if rec.queries is not None:
            rec.queries.append(q.detach())
        sizes = [t.numel() for t in (rec.usage, rec.counts) if t is not None]
        if not sizes:
            return
        n = sizes[0]  # experts on entry
        flat_ids, flat_g = ids.reshape(-1), g.detach().reshape(-1)  # (T*h*k,)
        if self.num_experts > n:
            keep = flat_ids < n
            flat_ids, flat_g = flat_ids[keep], flat_g[keep]
        if rec.usage is not None:
            rec.usage.index_add_(0, flat_ids, flat_g.to(rec.usage.dtype))
        if rec.counts is not None:
            rec.counts += torch.bincount(flat_ids, minlength=n)

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
        if self.expert_slice is not None:  # drawn whole (the same numbers at any world size), kept sliced
            u, v = self.expert_slice.take(u), self.expert_slice.take(v)
        self.background = torch.cat([self.background, self.background.new_zeros(rows * self.n_cols)])
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
        self.old_experts_open = False
        self.grads.clear()

    @torch.no_grad()
    def open_old_experts(self) -> None:
        """Let the frozen rows' experts (their ``u``/``v``) train again while their keys and
        the column keys stay frozen, so retrieval scores of old rows do not move (sparse
        memory finetuning on a grown layer: the optimizer picks which rows to update)."""
        self.old_experts_open = True
        for shard in self.shards:
            shard.frozen = False  # a commit compares their rows (delta shards)
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
        self.old_experts_open = False
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
        width = self.config.d_model if self.expert_slice is None else self.expert_slice.width
        if u.shape != (n1 * self.n_cols, width) or v.shape != u.shape:
            raise ConfigError(f"expert tables of shape {tuple(u.shape)} do not fit a {n1} x {self.n_cols} grid")
        self.frozen_row_keys = row_keys[:frozen_rows].detach()
        self.row_keys = nn.Parameter(row_keys[frozen_rows:].detach().clone())
        self.expert_u, self.expert_v = u, v
        self.shards = shards
        self.old_experts_open = False
        self.config.n_rows = n1
        self.grads.clear()

    # ---------------------------------------------------------------- expert parallel
    def slice_experts(self, rank: int, world: int, group=None) -> None:
        """Keep columns ``[rank*d/P, (rank+1)*d/P)`` of ``u`` and ``v`` (expert parallel:
        ranks mix their slices, :class:`~lifelong.experts.ExpertMixSliced`). Memory 1/P."""
        if self.expert_slice is not None:
            raise ConfigError("this PEER layer's experts are already sliced")
        if self.config.d_model % world:
            raise ConfigError(f"--expert-parallel: d_model {self.config.d_model} is not divisible by {world} ranks")
        sl = ExpertSlice(rank, world, self.config.d_model, group)
        self.expert_u, self.expert_v = sl.take(self.expert_u), sl.take(self.expert_v)
        self.expert_slice = sl

    def grad_square_means(self, gu: Tensor, gv: Tensor) -> Tensor:
        """(R, 2): mean over d_model of the squared row gradients of ``u`` and ``v`` (RowAdam's
        second moment), summed over the ranks' column slices when sliced."""
        if self.expert_slice is None:
            return torch.stack([gu.pow(2).mean(1), gv.pow(2).mean(1)], dim=1).float()
        return self.expert_slice.square_means(gu, gv)

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"d_model={c.d_model}, heads={c.heads}, top_k={c.top_k}, d_key={c.d_key}, "
            f"grid={self.n_rows}x{self.n_cols} ({self.num_experts} experts, {self.frozen_rows} rows frozen)"
        )


def _sharded_group():
    from .distributed import sharded_group  # no cycle at import time: distributed imports nothing of ours

    return sharded_group()


def _sync_batch_norm(x: Tensor, bn: nn.BatchNorm1d, group) -> Tensor:
    from .distributed import sync_batch_norm

    return sync_batch_norm(x, bn, group)


@contextmanager
def recording(layers: Mapping[str, PEERLayer], *, queries: bool = False, usage: bool = False,
              counts: bool = False) -> Iterator[dict[str, Recording]]:
    """:meth:`PEERLayer.record` on several layers at once: ``{name: Recording}``."""
    with ExitStack() as stack:
        yield {name: stack.enter_context(layer.record(queries=queries, usage=usage, counts=counts)) for name, layer in layers.items()}
