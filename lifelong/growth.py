"""Growth policies: what grows and what freezes in a cycle, and where new row keys start.

- ``full``: no growth; every expert, key and dense weight trains (a fine-tune).
- ``freeze-experts``: every layer grows ``grow_rows`` rows; old experts, row keys and the
  column codebook are frozen (bit-identical from now on); dense parts and queries train.
- ``freeze-all``: the same growth, and everything old is frozen: only the new rows' keys
  and experts train.

New row keys start from the new data's queries (``key_init="queries"``): k-means centres
of the row halves of the queries the new stream produces, so new experts are reached by
the new domain from the first step.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .config import CycleConfig
from .evaluate import evaluate_loss
from .model import PEERLM
from .peer import recording

__all__ = ["apply_policy", "init_new_keys"]


@torch.no_grad()
def init_new_keys(model: PEERLM, blocks: np.ndarray, rows: int, *, seed: int = 0, max_queries: int = 16384) -> dict[str, torch.Tensor]:
    """Row keys (rows, dk/2) per PEER layer for a growth of ``rows`` rows, from ``blocks``' queries.

    k-means (a few Lloyd steps) on the row halves ``q1`` of the new data's queries; each new
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
        centres = q1[torch.randperm(q1.shape[0], generator=g)[:rows]].clone()  # (rows, dk/2)
        if centres.shape[0] < rows:  # fewer queries than rows: pad with random directions
            centres = torch.cat([centres, torch.randn(rows - centres.shape[0], half, generator=g)])
        for _ in range(10):
            assign = (q1 @ centres.t()).argmax(1)  # (Q,)
            for r in range(rows):
                members = q1[assign == r]
                if len(members):
                    centres[r] = members.mean(0)
        scale = layer.all_row_keys().detach().norm(dim=1).max().cpu()
        out[name] = (centres / centres.norm(dim=1, keepdim=True).clamp_min(1e-8) * scale).to(layer.expert_u)
    return out


def apply_policy(model: PEERLM, cfg: CycleConfig, new_blocks: np.ndarray) -> dict[str, Any]:
    """Grow and freeze ``model`` according to ``cfg.policy``; returns what was done (for metrics)."""
    layers = model.peer_layers()
    for p in model.parameters():
        p.requires_grad_(True)
    if cfg.policy == "full":
        for layer in layers.values():
            layer.unfreeze()
        return {"grown_rows": 0}
    keys = init_new_keys(model, new_blocks, cfg.grow_rows, seed=cfg.seed) if cfg.key_init == "queries" else {}
    for name, layer in layers.items():
        layer.freeze()
        layer.grow(cfg.grow_rows, init_keys=keys.get(name))
    if cfg.policy == "freeze-all":
        for p in model.parameters():
            p.requires_grad_(False)
        for layer in layers.values():
            layer.row_keys.requires_grad_(True)  # only the new rows: their keys and experts
            layer.freeze_query()
    else:
        for layer in layers.values():
            layer.freeze_query(False)
    return {"grown_rows": cfg.grow_rows}
