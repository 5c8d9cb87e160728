"""TensorBoard event files for training steps, cycles and audits.

Open them with ``tensorboard --logdir STORE/tensorboard``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .model import PEERLM

__all__ = ["Monitor"]


class Monitor:
    """A thin wrapper over ``torch.utils.tensorboard.SummaryWriter`` with our tag names."""

    def __init__(self, log_dir: str | Path):
        from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: keep it lazy

        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(str(self.log_dir))

    def train_step(self, step: int, loss: float, lr: float) -> None:
        self.writer.add_scalar("train/loss", loss, step)
        self.writer.add_scalar("train/lr", lr, step)

    def cycle(
        self,
        cycle: int,
        metrics: dict[str, Any],
        model: PEERLM | None = None,
        usage_counts: dict[str, torch.Tensor] | None = None,
        sample: str | None = None,
    ) -> None:
        w = self.writer
        for stream, loss in metrics.get("losses", {}).items():
            if loss is not None:
                w.add_scalar(f"heldout_loss/{stream}", loss, cycle)
        for stream, f in metrics.get("forgetting", {}).items():
            w.add_scalar(f"forgetting/{stream}", f, cycle)
        for key in ("mean_heldout_loss", "mean_forgetting", "backward_transfer", "forward_transfer", "experts"):
            if isinstance(metrics.get(key), (int, float)):
                w.add_scalar(f"cycle/{key}", metrics[key], cycle)
        for layer, u in metrics.get("usage", {}).items():
            w.add_scalar(f"usage/{layer}/used_percent", 100.0 * u["used_share"], cycle)
            w.add_scalar(f"usage/{layer}/kl_uniform", u["kl_uniform"], cycle)
        if model is not None:  # parameters and buffers (expert tables included) of the model in memory
            size = sum(t.numel() * t.element_size() for t in [*model.buffers(), *model.parameters()])
            w.add_scalar("cycle/model_bytes", size, cycle)
        for name, counts in (usage_counts or {}).items():
            w.add_histogram(f"usage_hist/{name}", counts.float(), cycle)
        if sample:
            w.add_text("sample", sample, cycle)
        w.flush()

    def audit(self, version: int, report: Any) -> None:
        """Audit figures (a :class:`lifelong.audit_report.AuditReport`) at step = version id."""
        stats = {"total": report.total, **{name: a.total for name, a in report.layers.items()}}
        for name, st in stats.items():
            for key in ("recall", "recall_up_to_ties", "exact_match_share", "rank_agreement", "max_score_diff"):
                self.writer.add_scalar(f"audit/{name}/{key}", float(getattr(st, key)), version)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
