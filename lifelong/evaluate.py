"""Evaluation: held-out blocks and loss, the loss matrix, forgetting, transfer, expert usage.

``L[i][j]`` is the held-out loss (nats/token) on stream ``j`` after cycle ``i``; rows are
versions along HEAD's first-parent chain, each stored in that version's ``metrics["losses"]``.
Lower is better, so:

- forgetting_j = L[last][j] - min_{i < last} L[i][j]   (how much worse than its best; >= 0 is bad)
- BWT = mean_j (L[t_j][j] - L[last][j])                (t_j: the cycle that trained j; > 0 = improved)
- FWT = mean_j (b - B_j)   B_j: the parent's loss on j just before the cycle that first trained j,
                           b = ln(vocab), the loss of a uniform predictor (> 0 = earlier streams helped)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from streams import StreamRegistry, pack_blocks

from .errors import DataError
from .model import PEERLM
from .peer import recording

__all__ = [
    "evaluate_loss", "heldout_blocks", "LossMatrix", "loss_matrix", "stream_order", "expert_usage",
    "continual_metrics", "kl_to_uniform", "routing_retention", "experts_when_trained",
]


def heldout_blocks(registry: StreamRegistry, streams: str | list[str], block_size: int, pad_id: int, max_tokens: int) -> np.ndarray:
    """Held-out token blocks (n, block_size + 1) int64 of one or more streams.

    Up to ``max_tokens`` of each stream's held-out text (a stable prefix: the split is by
    document hash), packed into blocks; a stream's last partial block is padded with
    ``pad_id`` (ignored by the loss). Empty (0, block_size + 1) when there is none.
    """
    parts = [np.zeros((0, block_size + 1), dtype=np.int64)]
    for name in [streams] if isinstance(streams, str) else streams:
        tokens = registry.heldout(name, max_tokens=max_tokens).tokens
        if tokens.size:
            parts.append(pack_blocks(tokens, block_size, pad_id=pad_id, seed=None).astype(np.int64))
    return np.concatenate(parts)


@torch.no_grad()
def evaluate_loss(model: PEERLM, blocks: np.ndarray, batch_size: int = 8, max_batches: int | None = None) -> float:
    """Mean next-token cross-entropy (nats) over token blocks (n, L+1), in eval mode."""
    if len(blocks) == 0:
        raise DataError("no evaluation blocks")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    try:
        for b, i in enumerate(range(0, len(blocks), batch_size)):
            if max_batches is not None and b >= max_batches:
                break
            batch = torch.from_numpy(np.ascontiguousarray(blocks[i : i + batch_size])).long().to(device)
            _, loss = model(batch[:, :-1], batch[:, 1:])
            n = int((batch[:, 1:] != model.config.pad_id).sum())
            if n == 0:
                continue
            total += float(loss) * n
            count += n
    finally:
        model.train(was_training)
    if count == 0:
        raise DataError("evaluation blocks hold only padding")
    return total / count


@dataclass
class LossMatrix:
    versions: list[int]  # row labels, oldest first
    streams: list[str]  # column labels, in order first trained
    trained: list[str | None]  # the stream each row's cycle trained (None: init/other)
    values: list[list[float | None]]  # values[i][j], None where not evaluated
    before: dict[str, float] = field(default_factory=dict)  # B_j: loss on j before first training on it
    baseline: float | None = None  # b: loss of a uniform predictor

    def column(self, j: int) -> list[float]:
        return [row[j] for row in self.values if row[j] is not None]  # type: ignore[misc]

    def forgetting(self) -> dict[str, float]:
        """Per stream seen before the last row: last loss minus the best earlier loss (nats)."""
        out: dict[str, float] = {}
        if len(self.values) < 2:
            return out
        last = self.values[-1]
        for j, name in enumerate(self.streams):
            earlier = [row[j] for row in self.values[:-1] if row[j] is not None]
            if earlier and last[j] is not None and name != self.trained[-1]:
                out[name] = float(last[j]) - min(earlier)  # type: ignore[arg-type]
        return out

    def backward_transfer(self) -> float | None:
        diffs = []
        for j, name in enumerate(self.streams):
            if name in self.trained[:-1] and self.values[-1][j] is not None:
                t = max(i for i, s in enumerate(self.trained) if s == name)
                if self.values[t][j] is not None:
                    diffs.append(self.values[t][j] - self.values[-1][j])  # type: ignore[operator]
        return float(np.mean(diffs)) if diffs else None

    def forward_transfer(self) -> float | None:
        if self.baseline is None or not self.before:
            return None
        return float(np.mean([self.baseline - b for b in self.before.values()]))

    def format_table(self) -> str:
        width = max([8] + [len(s) for s in self.streams])
        lines = ["version  trained".ljust(28) + "".join(s.rjust(width + 2) for s in self.streams)]
        for v, t, row in zip(self.versions, self.trained, self.values):
            cells = "".join(("-" if x is None else f"{x:.3f}").rjust(width + 2) for x in row)
            lines.append(f"{v:<9}{(t or '-'):<19}" + cells)
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "versions": self.versions,
            "streams": self.streams,
            "trained": self.trained,
            "values": self.values,
            "forgetting": self.forgetting(),
            "backward_transfer": self.backward_transfer(),
            "forward_transfer": self.forward_transfer(),
        }


def loss_matrix(chain: list[Any]) -> LossMatrix:
    """Build the matrix from versions (oldest first) carrying ``metrics["losses"]``."""
    streams: list[str] = []
    rows = [v for v in chain if isinstance(v.metrics.get("losses"), dict)]
    for v in rows:
        for s in v.metrics["losses"]:
            if s not in streams:
                streams.append(s)
    before: dict[str, float] = {}
    baseline = None
    for v in rows:
        s, b = v.metrics.get("stream"), v.metrics.get("loss_before")
        if s and isinstance(b, (int, float)) and s not in before:
            before[s] = float(b)
            baseline = v.metrics.get("baseline_loss", baseline)
    return LossMatrix(
        versions=[v.id for v in rows],
        streams=streams,
        trained=[v.metrics.get("stream") for v in rows],
        values=[[v.metrics["losses"].get(s) for s in streams] for v in rows],
        before=before,
        baseline=baseline,
    )


def stream_order(chain: list[Any], cursors: dict[str, Any], stream: str) -> list[str]:
    """Streams in the order they were first evaluated along ``chain`` (oldest first), then
    any other stream with a cursor, then ``stream``: the columns of the next matrix row."""
    seen: list[str] = []
    for name in [s for v in chain for s in v.metrics.get("losses", {})] + list(cursors) + [stream]:
        if name not in seen:
            seen.append(name)
    return seen


def kl_to_uniform(weights: torch.Tensor) -> float:
    """KL(p || uniform) in nats, ``p`` = per-expert accumulated router weight, normalised
    (= log N - H(p); 0 is perfectly even; PEER paper, Table 2). NaN when all weights are 0."""
    total = float(weights.sum())
    if total <= 0:
        return math.nan
    p = weights[weights > 0].double() / total
    return max(float((p * (p * weights.numel()).log()).sum()), 0.0)


@torch.no_grad()
def expert_usage(
    model: PEERLM,
    blocks: np.ndarray,
    batch_size: int = 8,
    max_batches: int | None = 8,
    counts: dict[str, torch.Tensor] | None = None,
) -> dict[str, dict[str, float]]:
    """Per PEER layer of ``model`` run on ``blocks``: share of experts retrieved at least
    once, and KL(usage || uniform).

    Usage is the router's accumulated softmax weight per expert (paper, Table 2); pass a dict
    as ``counts`` to receive those (N,) tensors.
    """
    layers = model.peer_layers()
    with recording(layers, usage=True) as recs:
        evaluate_loss(model, blocks, batch_size, max_batches)
    out = {}
    for name, rec in recs.items():
        u = rec.usage
        assert u is not None
        if counts is not None:
            counts[name] = u.cpu()
        kl = kl_to_uniform(u)
        out[name] = {"used_share": float((u > 0).double().mean()), "kl_uniform": kl if math.isfinite(kl) else None, "experts": int(u.numel())}
    return out


def routing_retention(usage: dict[str, torch.Tensor], experts_then: dict[str, int]) -> float | None:
    """Share of the router weight in ``usage`` ({layer: (N,) weight per expert}, e.g. an old
    stream's held-out text under the current model) that falls on the experts each layer had
    when that stream was trained (ids below ``experts_then[layer]``). None without weight."""
    total = sum(float(u.sum()) for u in usage.values())
    if total <= 0:
        return None
    return sum(float(u[: experts_then.get(name, u.numel())].sum()) for name, u in usage.items()) / total


def experts_when_trained(chain: list[Any], stream: str) -> dict[str, int] | None:
    """Experts per PEER layer in the last version of ``chain`` that trained ``stream``."""
    for v in reversed(chain):
        if v.metrics.get("stream") == stream:
            geometry = v.config.get("layers", {})
            cols = v.config.get("model", {}).get("peer", {}).get("n_cols")
            return {name: int(g["n_rows"]) * int(cols) for name, g in geometry.items()} if cols else None
    return None


def continual_metrics(matrix: LossMatrix) -> dict[str, Any]:
    """Summary figures for the last row of the matrix."""
    last = [x for x in matrix.values[-1] if x is not None] if matrix.values else []
    forgetting = matrix.forgetting()
    return {
        "mean_heldout_loss": float(np.mean(last)) if last else None,  # None: no stream has held-out text
        "forgetting": forgetting,
        "mean_forgetting": float(np.mean(list(forgetting.values()))) if forgetting else 0.0,
        "backward_transfer": matrix.backward_transfer(),
        "forward_transfer": matrix.forward_transfer(),
    }
