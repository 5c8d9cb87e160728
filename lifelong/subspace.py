"""Null-space training of the dense layers: learn new text without moving old text's outputs.

Under ``freeze-all`` only the new expert rows train, and every old tensor is frozen. That keeps
old text's computation, but it also means the new stream is learned through the new experts
alone, reached by queries from frozen layers (docs/continual.md: new-stream loss +12% against
a dense fine-tune). Null-space training (``null_space``; the idea of Adam-NSCL, Wang et al.
2021, and of GPM, Saha et al. 2021) lets the dense linear maps train as well, but only in
directions the earlier streams' inputs do not occupy:

- After every cycle, each linear map in the blocks (attention ``qkv`` and ``proj``, the PEER
  query nets, dense FFNs) adds the covariance of its inputs on the stream just trained,
  trace-normalised so that every stream weighs the same, to its ``input_cov`` buffer
  (d_in x d_in, committed with the version's dense weights; no text is kept).
- Before a ``freeze-all`` cycle, each map gets the basis ``U`` of the top eigenvectors of
  ``input_cov`` holding ``energy`` of its trace. After every optimizer step the update of its
  weight ``W`` (d_out x d_in) is projected: ``W <- W_prev + (W - W_prev)(I - U U^T)``.
- Why old text keeps its outputs: an old input ``x`` lies (up to ``1 - energy`` of its energy)
  in span ``U``, so ``(W - W_prev) x ~ 0``: the map's output on ``x`` does not change, so the
  next layer's input does not change either, and so on through the network. Embeddings,
  norms and biases stay frozen: they act on every input alike. New text whose inputs have
  components outside span ``U`` changes the maps' outputs, so its queries can move to the
  new experts and its attention can adapt.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from .evaluate import evaluate_loss
from .model import PEERLM

__all__ = ["NullSpace", "record_inputs"]


@torch.no_grad()
def record_inputs(model: PEERLM, blocks: np.ndarray, max_tokens: int = 65_536, batch_size: int = 8) -> int:
    """Add ``blocks``' input covariance (trace 1) to every projected map's ``input_cov``.
    Returns the tokens it was computed on (0 when there is nothing to record)."""
    linears = model.linear_maps()
    if not linears or len(blocks) == 0:
        return 0
    sums = {name: torch.zeros(m.in_features, m.in_features, device=m.weight.device, dtype=torch.float32) for name, m in linears.items()}

    def hook(name: str):
        def pre(_m: nn.Module, args: tuple[Tensor, ...]) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).float()  # (T, d_in)
            sums[name] += x.t() @ x
        return pre

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in linears.items()]
    try:
        batches = max(1, -(-max_tokens // (blocks.shape[1] * batch_size)))
        evaluate_loss(model, blocks, batch_size=batch_size, max_batches=batches)
    finally:
        for h in handles:
            h.remove()
    for name, m in linears.items():
        total = sums[name].trace()
        if float(total) > 0:
            m.input_cov.add_(sums[name] / total)
    return int(min(len(blocks), batches * batch_size) * (blocks.shape[1] - 1))


@dataclass
class NullSpace:
    """The projected maps of one cycle: weight, projector ``I - U U^T`` and last weights."""

    weights: list[Tensor] = field(default_factory=list)
    projectors: list[Tensor] = field(default_factory=list)  # (d_in, d_in) each
    previous: list[Tensor] = field(default_factory=list)
    ranks: dict[str, int] = field(default_factory=dict)  # protected input dimensions per map
    unrecorded: list[str] = field(default_factory=list)  # maps with no input record: left frozen

    @classmethod
    @torch.no_grad()
    def before_training(cls, model: PEERLM, energy: float) -> NullSpace:
        """Make every recorded map trainable in the null space of its recorded inputs."""
        out = cls()
        for name, m in model.linear_maps().items():
            cov = m.input_cov
            if float(cov.trace()) <= 0:
                out.unrecorded.append(name)
                continue
            evals, evecs = torch.linalg.eigh(cov.double())  # ascending
            evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
            share = evals.cumsum(0) / evals.sum()  # (d_in,)
            rank = int((share < energy).sum()) + 1
            u = evecs[:, :rank]  # (d_in, r)
            eye = torch.eye(cov.shape[0], dtype=torch.float64, device=cov.device)
            out.weights.append(m.weight)
            out.projectors.append((eye - u @ u.t()).to(m.weight.dtype))
            out.previous.append(m.weight.detach().clone())
            out.ranks[name] = rank
            m.weight.requires_grad_(True)
        return out

    @torch.no_grad()
    def project(self) -> None:
        """Keep only the part of each weight's update that old inputs do not see."""
        for w, proj, prev in zip(self.weights, self.projectors, self.previous):
            w.copy_(prev + (w - prev) @ proj)  # (d_out, d_in)
            prev.copy_(w)
