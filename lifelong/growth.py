"""Growth policies: what grows and what freezes in a cycle, and where new row keys start.

- ``full``: no growth; every expert, key and dense weight trains (a fine-tune).
- ``freeze-experts``: every layer grows ``grow_rows`` rows; old experts, row keys and the
  column codebook are frozen (bit-identical from now on); dense parts and queries train.
- ``freeze-all``: the same growth, and everything old is frozen: only the new rows' keys
  and experts train.
- ``sparse``: sparse memory finetuning (Lin et al. 2025, arXiv 2510.15103). No growth;
  everything is frozen except, per batch and layer, the ``top_t`` experts the batch uses
  much more than the background does, ranked by TF-IDF: term frequency = the batch's
  retrieval counts, document frequency = how many background retrievals (one head's top-k
  for one token, on the streams trained so far; kept per expert in
  ``PEERLayer.background``: no old text needed) selected the expert. With ``sparse_growth``
  it also grows as ``freeze-all`` does: the new rows train in full (isolated from old
  queries), the old rows' experts (not their keys) only where TF-IDF selects them.
- ``branch``: first freezes the parent's dense weights as a branch that sees only the rows
  that exist now (:mod:`lifelong.branches`), then grows and trains as ``freeze-experts``.
  Prediction mixes the branches by their posterior on the context, so old text is predicted
  by its own, unchanged branch (within ``log K / L`` nats per token); no isolation is needed.

New row keys start from the new data's queries (``key_init="queries"``): k-means centres
of the row halves of the queries the new stream produces, so new experts are reached by
the new domain from the first step.

**Routing isolation** (``routing_isolation``, on by default for the growth policies): old
streams' text must keep retrieving the experts it retrieved before. Every cycle keeps a
sample of the queries it trained on in each PEER layer (``PEERLayer.anchors``: queries, no
text, committed with the version). Before a growth, each anchor ``a`` gets the most a new
row's half score ``q1(a) . c`` may reach without the new row's experts entering the anchor's
top-k: ``s_k(a) - max_j q2(a) . C2_j`` (its k-th old score minus its best column score; the
column codebook and the old keys are frozen, so the bound stays valid), less a margin.
After every optimizer step (and right after growth) the new row keys are projected back into
that region. The new rows then never outrank an anchor's old top-k, so old-domain queries
keep their experts while new-domain queries, away from the anchors, move to the new ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np
import torch
from torch import Tensor

from .branches import snapshot
from .config import CycleConfig, require
from .errors import ConfigError
from .evaluate import evaluate_loss
from .model import PEERLM
from .peer import PEERLayer, product_key_topk, recording

__all__ = [
    "Growth", "RoutingIsolation", "SparseSelection", "apply_policy", "init_new_keys", "record_anchors", "record_background",
    "ANCHORS_PER_STREAM", "MAX_ANCHORS",
]

ANCHORS_PER_STREAM = 4096  # query vectors (token x head) kept per layer from each cycle's stream
MAX_ANCHORS = 16384  # per layer; older anchors are subsampled to stay within it


@torch.no_grad()
def init_new_keys(model: PEERLM, blocks: np.ndarray, rows: int, *, seed: int = 0, max_queries: int = 16384) -> dict[str, torch.Tensor]:
    """Row keys (rows, dk/2) per PEER layer for a growth of ``rows`` rows, from ``blocks``' queries.

    Spherical k-means (``faiss.Kmeans``, 10 iterations) on the row halves ``q1`` of the new data's queries; each new
    key points at a cluster centre, scaled to the largest existing row-key norm so that new
    experts win for queries of the new domain without outranking old keys everywhere.
    """
    layers = model.peer_layers()
    with recording(layers, queries=True) as recs:
        evaluate_loss(model, blocks, batch_size=8, max_batches=max(1, max_queries // (blocks.shape[1] * 8)))
    out = {}
    g = torch.Generator().manual_seed(seed)
    for name, layer in layers.items():
        q = torch.cat(recs[name].queries or [])  # (Q, h, dk)
        half = q.shape[-1] // 2
        q1 = q[..., :half].reshape(-1, half).float().cpu()  # (Q*h, dk/2)
        q1 = q1[torch.randperm(q1.shape[0], generator=g)[:max_queries]]
        if q1.shape[0] < rows:  # fewer queries than rows: every query, padded with random directions
            centres = torch.cat([q1, torch.randn(rows - q1.shape[0], half, generator=g)])  # (rows, dk/2)
        else:  # spherical: the keys are directions, scaled below
            km = faiss.Kmeans(half, rows, niter=10, seed=seed, spherical=True, min_points_per_centroid=1)
            km.train(np.ascontiguousarray(q1.numpy(), dtype=np.float32))
            centres = torch.from_numpy(km.centroids.copy())  # (rows, dk/2)
        scale = layer.all_row_keys().detach().norm(dim=1).max().cpu()
        out[name] = (centres / centres.norm(dim=1, keepdim=True).clamp_min(1e-8) * scale).to(layer.expert_u)
    return out


@dataclass
class RoutingIsolation:
    """Keeps the trainable (new) row keys of each layer out of its anchors' top-k.

    The allowed region of a new key ``c`` is the intersection of the half-spaces
    ``q1(a) . c <= allowed(a)``: convex. :meth:`before_growth` finds one point strictly inside
    it per layer (the origin when every bound is positive); :meth:`project` moves a violating
    key along the segment toward that point just far enough, which is exact and cheap.
    """

    layers: dict[str, PEERLayer]
    q1: dict[str, Tensor]  # (A, dk/2) row halves of the anchors
    allowed: dict[str, Tensor]  # (A,) the most q1(a) . c may reach for a new row key c
    inside: dict[str, Tensor]  # (dk/2,) a point of the allowed region (best effort when none was found)

    @classmethod
    @torch.no_grad()
    def before_growth(cls, model: PEERLM, margin: float) -> RoutingIsolation | None:
        """Bounds from the current (frozen) keys; None when no layer has anchors."""
        layers, q1s, allowed, inside = {}, {}, {}, {}
        for name, layer in model.peer_layers().items():
            if layer.anchors.shape[0] == 0:
                continue
            q = layer.anchors.to(layer.col_keys)  # (A, dk)
            scores, _ = product_key_topk(q, layer.all_row_keys().detach(), layer.col_keys.detach(), layer.config.top_k)  # (A, k)
            q1, q2 = q.chunk(2, dim=-1)  # (A, dk/2) each
            bound = scores[:, -1] - (q2 @ layer.col_keys.detach().t()).amax(-1)  # (A,) s_k(a) - max_j q2 . C2_j
            layers[name], q1s[name], allowed[name] = layer, q1, bound - margin * bound.abs()
            inside[name] = _inside_point(q1, allowed[name])
        return cls(layers, q1s, allowed, inside) if layers else None

    @torch.no_grad()
    def project(self) -> int:
        """Move every violating new row key toward the layer's inside point until no anchor
        is violated. Returns the number of keys that had to move."""
        moved = 0
        for name, layer in self.layers.items():
            c, q1, allowed, p = layer.row_keys.data, self.q1[name], self.allowed[name], self.inside[name]  # (r, dk/2), ...
            dots = c @ q1.t()  # (r, A)
            over = dots > allowed  # (r, A)
            bad = over.any(1)  # (r,)
            if not bool(bad.any()):
                continue
            pd = q1 @ p  # (A,) < allowed where p is inside
            # On the segment c + t (p - c), anchor a holds once t >= (dots - allowed) / (dots - pd). An
            # anchor p itself violates (the region is empty: tiny key dims, many anchors) cannot be
            # fixed this way and is left to violations(); it does not drag the key onto p.
            fixable = over & (pd < allowed)  # (r, A)
            need = torch.where(fixable, (dots - allowed) / (dots - pd).clamp_min(1e-12), torch.zeros_like(dots))  # (r, A)
            t = (need.amax(1) * (1 + 1e-4) + 1e-6).clamp(max=1.0)  # (r,) a hair past the bound
            c[bad] += t[bad].unsqueeze(1) * (p - c[bad])
            moved += int(bad.sum())
        return moved

    def violations(self) -> int:
        """(anchor, new row) pairs where the new row could enter the anchor's top-k."""
        return sum(int((layer.row_keys.detach() @ self.q1[n].t() > self.allowed[n]).sum()) for n, layer in self.layers.items())


def _inside_point(q1: Tensor, allowed: Tensor, steps: int = 3000) -> Tensor:
    """A point p with q1 @ p < allowed (strictly): the origin when every bound is positive,
    else found by minimising a smooth maximum of the normalised violations (Adam), stopping as
    soon as p is strictly inside. When the region is empty, the point violating least."""
    p = q1.new_zeros(q1.shape[1])
    if bool((allowed > 0).all()):
        return p
    norm = q1.norm(dim=1).clamp_min(1e-12)  # (A,)
    qn, bn = q1 / norm[:, None], allowed / norm  # the same half-spaces, unit normals
    p.requires_grad_(True)
    opt = torch.optim.Adam([p], lr=0.02)
    with torch.enable_grad():
        for step in range(steps):
            gap = qn @ p - bn  # (A,) > 0: violated
            if step % 25 == 0 and float(gap.detach().max()) < -1e-4:
                break
            opt.zero_grad()
            (torch.logsumexp(gap * 100.0, 0) / 100.0).backward()  # ~ max violation, smooth
            opt.step()
    return p.detach()


@dataclass
class SparseSelection:
    """Per batch and layer, the ``top_t`` experts by TF-IDF against the background usage."""

    idf: list[Tensor]  # per layer (in peer_layers() order): (N_old,) log((D + 1) / (df + 1)), D retrievals
    top_t: int

    @classmethod
    def of(cls, model: PEERLM, top_t: int) -> SparseSelection:
        """Over each layer's experts as they are now: ids beyond them (grown after this) are
        new rows, always trained."""
        idf = [torch.log((layer.background_docs + 1) / (layer.background + 1)) for layer in model.peer_layers().values()]
        return cls(idf, top_t)

    def __call__(self, counts: list[Tensor]) -> list[Tensor | None]:
        """counts: per layer (N,) retrieval counts of this batch -> expert ids to train per layer."""
        out: list[Tensor | None] = []
        for tf, idf in zip(counts, self.idf):
            old, grown = tf[: idf.numel()], tf[idf.numel() :]  # (N_old,), (N - N_old,)
            score = (old.to(idf.dtype) * idf).masked_fill(old == 0, -math.inf)  # (N_old,); never an unused one
            used = int((old > 0).sum())
            keep = score.topk(min(self.top_t, used)).indices if used else tf.new_zeros(0)
            out.append(torch.cat([keep, grown.nonzero().squeeze(1) + idf.numel()]) if grown.numel() else keep)
        return out


@dataclass
class Growth:
    """What :func:`apply_policy` did, and what the training loop must call."""

    info: dict[str, Any] = field(default_factory=dict)  # recorded in the version's metrics
    isolation: RoutingIsolation | None = None
    sparse: SparseSelection | None = None  # the rows each step may update (policy sparse)

    @property
    def after_step(self) -> Callable[[], int] | None:
        return self.isolation.project if self.isolation is not None else None


@torch.no_grad()
def record_background(model: PEERLM, blocks: np.ndarray, batch_size: int, max_batches: int = 32) -> int:
    """Add the first ``max_batches`` batches of ``blocks`` to every PEER layer's background
    usage: per expert, how many (token, head) retrievals selected it (its document
    frequency), and how many retrievals there were. Returns the batches counted.

    Documents are single retrievals, not batches: a batch of a few thousand tokens touches
    nearly every expert of a pool of thousands, so per-batch presence saturates (idf 0 for
    almost every expert, measured on the benchmark's base model) and TF-IDF ranks nothing."""
    layers = model.peer_layers()
    if not layers or len(blocks) == 0:
        return 0
    with recording(layers, counts=True) as recs:
        evaluate_loss(model, blocks, batch_size=batch_size, max_batches=max_batches)
    for name, layer in layers.items():
        counts = recs[name].counts
        assert counts is not None
        layer.background[: counts.numel()] += counts.to(layer.background.dtype)
        layer.background_docs += counts.sum() / layer.config.top_k  # tokens x heads
    return min(max_batches, -(-len(blocks) // batch_size))


@torch.no_grad()
def record_anchors(model: PEERLM, blocks: np.ndarray, *, per_stream: int = ANCHORS_PER_STREAM, cap: int = MAX_ANCHORS,
                   seed: int = 0) -> int:
    """Add a sample of ``blocks``' queries to every PEER layer's anchors (older anchors are
    subsampled to keep at most ``cap``). Returns the anchors per layer afterwards."""
    layers = model.peer_layers()
    if not layers or len(blocks) == 0:
        return 0
    heads = next(iter(layers.values())).config.heads
    tokens = max(1, per_stream // heads)
    batches = max(1, -(-tokens // (blocks.shape[1] * 8)))
    with recording(layers, queries=True) as recs:
        evaluate_loss(model, blocks, batch_size=8, max_batches=batches)
    g = torch.Generator().manual_seed(seed)
    for name, layer in layers.items():
        q = torch.cat(recs[name].queries or []).reshape(-1, layer.config.d_key)  # (T*h, dk)
        new = q[torch.randperm(q.shape[0], generator=g)[: min(per_stream, cap)].to(q.device)].to(layer.anchors)
        old = layer.anchors
        keep = max(0, min(old.shape[0], cap - new.shape[0]))
        old = old[torch.randperm(old.shape[0], generator=g)[:keep].to(old.device)]
        layer.anchors = torch.cat([old, new])
    return int(next(iter(layers.values())).anchors.shape[0])


def apply_policy(model: PEERLM, cfg: CycleConfig, new_blocks: np.ndarray) -> Growth:
    """Grow and freeze ``model`` according to ``cfg.policy`` (with routing isolation when
    the policy grows, it is on and the layers have anchors)."""
    layers = model.peer_layers()
    for p in model.parameters():
        p.requires_grad_(True)
    if cfg.policy == "full":
        for layer in layers.values():
            layer.unfreeze()
        return Growth({"grown_rows": 0})
    if cfg.policy == "branch":
        model.branches.append(snapshot(model))  # before growth: it sees the rows of today
        if not layers:  # a dense model: a branch of the dense weights, nothing to grow
            return Growth({"grown_rows": 0})
    if not layers:
        raise ConfigError(f"policy {cfg.policy} trains PEER layers, and the model has none (a dense model): "
                          "use --policy full or branch")
    if cfg.policy == "sparse" and not cfg.sparse_growth:
        return _sparse(model, cfg)
    keys = init_new_keys(model, new_blocks, cfg.grow_rows, seed=cfg.seed) if cfg.key_init == "queries" else {}
    for layer in layers.values():
        layer.freeze()
    # Old branches never see the new rows: isolation would only cost the live branch plasticity.
    isolate = cfg.routing_isolation and cfg.policy != "branch"
    isolation = RoutingIsolation.before_growth(model, cfg.isolation_margin) if isolate else None
    selection = None
    if cfg.policy == "sparse":  # sparse with growth: TF-IDF over the old experts; the new ones always train
        _check_top_t(model, cfg.top_t)
        selection = SparseSelection.of(model, cfg.top_t)
    for name, layer in layers.items():
        layer.grow(cfg.grow_rows, init_keys=keys.get(name))
    if cfg.policy in ("freeze-all", "sparse"):
        for p in model.parameters():
            p.requires_grad_(False)
        for layer in layers.values():
            layer.row_keys.requires_grad_(True)  # only the new rows: their keys and experts
            layer.freeze_query()
            if selection is not None:
                layer.open_old_experts()  # their u, v; old keys stay frozen, so isolation holds
    else:
        for layer in layers.values():
            layer.freeze_query(False)
    info: dict[str, Any] = {"grown_rows": cfg.grow_rows, "routing_isolation": isolation is not None}
    if selection is not None:
        info["top_t"] = cfg.top_t
    if isolation is not None:
        info["isolation_keys_moved_at_growth"] = isolation.project()
    return Growth(info, isolation, sparse=selection)


def _check_top_t(model: PEERLM, top_t: int) -> None:
    smallest = min(layer.num_experts for layer in model.peer_layers().values())
    require(top_t <= smallest, "top_t", f"top_t={top_t} exceeds the {smallest} experts of a PEER layer")


def _sparse(model: PEERLM, cfg: CycleConfig) -> Growth:
    """Everything frozen but the expert rows, which train only where the selection says."""
    layers = model.peer_layers()
    _check_top_t(model, cfg.top_t)
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in layers.values():
        layer.unfreeze()  # every expert row may be selected; keys, queries and dense parts stay frozen
        layer.row_keys.requires_grad_(False)
        layer.col_keys.requires_grad_(False)
        layer.freeze_query()
    background = int(next(iter(layers.values())).background_docs)
    return Growth({"grown_rows": 0, "top_t": cfg.top_t, "background_docs": background}, sparse=SparseSelection.of(model, cfg.top_t))
