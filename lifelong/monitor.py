"""TensorBoard event files for training steps, cycles and audits.

Open them with ``tensorboard --logdir STORE/tensorboard``. Non-finite figures are not
logged (a gap, never a ``nan`` point).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import torch

from .evaluate import LossMatrix
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
        matrix: LossMatrix | None = None,
    ) -> None:
        """Scalars, histograms and a sample of cycle ``cycle``; with ``matrix`` (the loss
        matrix of the cycle's chain, its new row last) also the image ``cycle/loss_matrix``
        (heatmap and forgetting per stream, as ``lifelong eval --plot`` draws it)."""
        w = self.writer
        for stream, loss in metrics.get("losses", {}).items():
            if _finite(loss):
                w.add_scalar(f"heldout_loss/{stream}", loss, cycle)
        for stream, f in metrics.get("forgetting", {}).items():
            if _finite(f):
                w.add_scalar(f"forgetting/{stream}", f, cycle)
        for key in ("mean_heldout_loss", "mean_forgetting", "backward_transfer", "forward_transfer", "experts"):
            if _finite(metrics.get(key)):
                w.add_scalar(f"cycle/{key}", metrics[key], cycle)
        for layer, u in metrics.get("usage", {}).items():
            if _finite(u.get("used_share")):
                w.add_scalar(f"usage/{layer}/used_percent", 100.0 * u["used_share"], cycle)
            if _finite(u.get("kl_uniform")):
                w.add_scalar(f"usage/{layer}/kl_uniform", u["kl_uniform"], cycle)
        if model is not None:  # parameters and buffers (expert tables included) of the model in memory
            size = sum(t.numel() * t.element_size() for t in [*model.buffers(), *model.parameters()])
            w.add_scalar("cycle/model_bytes", size, cycle)
        for name, counts in (usage_counts or {}).items():
            w.add_histogram(f"usage_hist/{name}", counts.float(), cycle)
        if sample:
            w.add_text("sample", sample, cycle)
        if matrix is not None and matrix.values:
            self._loss_matrix_image(cycle, matrix, metrics.get("forgetting"))
        w.flush()

    def _loss_matrix_image(self, cycle: int, matrix: LossMatrix, forgetting: dict[str, float] | None) -> None:
        """The loss-matrix figure as an image; a plotting failure only warns."""
        try:
            from .plots import figure_to_image, loss_matrix_figure

            fig = loss_matrix_figure(matrix, forgetting, title=f"cycle {cycle}")
            self.writer.add_image("cycle/loss_matrix", figure_to_image(fig), cycle, dataformats="HWC")
        except Exception as exc:  # noqa: BLE001 - a picture must never fail the cycle
            warnings.warn(f"TensorBoard image of cycle {cycle}'s loss matrix failed: {exc}", RuntimeWarning, stacklevel=3)

    def audit(self, version: int, report: Any) -> None:
        """Audit figures (a :class:`lifelong.audit_report.AuditReport`) at step = version id."""
        stats = {"total": report.total, **{name: a.total for name, a in report.layers.items()}}
        for name, st in stats.items():
            for key in ("recall", "recall_up_to_ties", "exact_match_share", "rank_agreement", "max_score_diff"):
                if _finite(value := float(getattr(st, key))):
                    self.writer.add_scalar(f"audit/{name}/{key}", value, version)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
