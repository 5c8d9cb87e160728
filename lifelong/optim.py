"""Row-wise sparse optimizer for expert tables.

:class:`RowAdam` is Adam with beta1 = 0 and one second-moment scalar per expert row (the
mean of the squared row gradient), updated lazily: only rows a batch touched are read or
written, so a step costs O(touched rows x d), independent of the pool size. It follows the
row-wise optimizers used for huge embedding tables (FBGEMM's row-wise AdaGrad / partial
row-wise Adam). State is kept for the trainable id range only: frozen experts have none.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .errors import ConfigError
from .peer import PEERLayer

__all__ = ["RowAdam"]


class RowAdam:
    """Sparse row-wise optimizer over the trainable expert rows of PEER layers."""

    def __init__(self, layers: list[PEERLayer], lr: float = 1e-2, beta2: float = 0.999, eps: float = 1e-8):
        if lr <= 0:
            raise ConfigError(f"invalid RowAdam 'lr': must be positive, got {lr}")
        if not 0.0 <= beta2 < 1.0:
            raise ConfigError(f"invalid RowAdam 'beta2': must be in [0, 1), got {beta2}")
        self.layers = list(layers)
        self.lr = lr
        self.beta2 = beta2
        self.eps = eps
        # per layer: (start id, second moments (rows, 2) for u and v, step counts (rows,))
        self.state: dict[int, tuple[int, Tensor, Tensor]] = {}

    def _layer_state(self, i: int, layer: PEERLayer) -> tuple[int, Tensor, Tensor]:
        """State for ids [start, n): kept across growth (new rows start fresh), dropped on freeze."""
        start, n = layer.trainable_start, layer.num_experts
        dev = layer.expert_u.device
        second = torch.zeros(n - start, 2, device=dev)
        steps = torch.zeros(n - start, device=dev, dtype=torch.int32)
        old = self.state.get(i)
        if old is not None:
            if old[0] == start and old[1].shape[0] == n - start:
                return old
            lo, hi = max(old[0], start), min(old[0] + old[1].shape[0], n)  # ids still trainable
            if hi > lo:
                second[lo - start : hi - start] = old[1][lo - old[0] : hi - old[0]]
                steps[lo - start : hi - start] = old[2][lo - old[0] : hi - old[0]]
        self.state[i] = (start, second, steps)
        return self.state[i]

    @torch.no_grad()
    def step(self, keep: list[Tensor | None] | None = None) -> int:
        """Apply the collected row gradients; returns the number of rows updated.

        ``keep[i]`` (expert ids of layer ``i``, or None for all) restricts the update of that
        layer to those rows: the others' gradients are dropped (sparse memory finetuning)."""
        updated = 0
        for i, layer in enumerate(self.layers):
            popped = layer.grads.pop()
            if popped is None:
                continue
            rows, gu, gv = popped  # (R,), (R, d), (R, d)
            if keep is not None and keep[i] is not None:
                mask = torch.isin(rows, keep[i])  # (R,)
                rows, gu, gv = rows[mask], gu[mask], gv[mask]
                if rows.numel() == 0:
                    continue
            start, second, steps = self._layer_state(i, layer)
            local = rows - start  # (R,)
            t = steps[local] + 1  # (R,)
            steps[local] = t
            g2 = layer.grad_square_means(gu, gv)  # (R, 2)
            m = second[local].mul_(self.beta2).add_(g2, alpha=1.0 - self.beta2)  # (R, 2)
            second[local] = m
            bias = 1.0 - torch.pow(self.beta2, t.to(m.dtype))  # (R,)
            denom = (m / bias[:, None]).sqrt_().add_(self.eps)  # (R, 2)
            table_dtype = layer.expert_u.dtype
            layer.expert_u.index_add_(0, rows, (gu / denom[:, :1].to(table_dtype)), alpha=-self.lr)
            layer.expert_v.index_add_(0, rows, (gv / denom[:, 1:].to(table_dtype)), alpha=-self.lr)
            updated += rows.numel()
        return updated

    def state_dict(self) -> dict[str, Tensor]:
        """Flat tensor dict (safetensors-ready) of the optimizer state."""
        out: dict[str, Tensor] = {}
        for i, (start, second, steps) in self.state.items():
            out[f"{i}.second"] = second
            out[f"{i}.steps"] = steps
            out[f"{i}.start"] = torch.tensor(start)
        return out

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.state = {}
        for key in state:
            if key.endswith(".start"):
                i = int(key.split(".")[0])
                self.state[i] = (int(state[key]), state[f"{i}.second"].clone(), state[f"{i}.steps"].clone())
