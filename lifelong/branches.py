"""Branches: frozen copies of earlier cycles' dense weights, mixed by their Bayesian posterior.

Policy ``branch`` (lifelong.growth) grows the expert pool like ``freeze-experts`` and, before
it does, freezes the parent's dense weights (embeddings, attention, norms, PEER query nets and
their BatchNorm statistics) as a :class:`Branch` that sees only the rows of the expert grid
that existed then. The live weights then train on the new stream as a fine-tune would. The
expert tables and keys are shared: old ones are frozen, and every branch reads them.

Prediction mixes the branches (the frozen ones and the live one) by the posterior of the
text seen so far in the context, with a uniform prior:

    p(x_t | x_<t) = sum_b w_b(t) p_b(x_t | x_<t),   w_b(t) ~ prod_{s<t} p_b(x_s | x_<s)

This is exact Bayesian model averaging over the branches, and it is causal: the weights at
position ``t`` use only tokens up to ``t``. Its summed log loss over a context of ``L``
tokens is at most the best branch's plus ``log K`` (K branches), so on old text, which an old
branch still predicts exactly as before (its weights and the experts it sees are
bit-identical), the mean loss rises by at most ``log K / L`` nats per token, whatever the
new branches learned. Training fits the live branch alone (``model.train()``); evaluation
and generation (``model.eval()``) use the mixture.

The price is compute at prediction time: one forward pass per branch (queries, retrieval and
dense layers; the expert tables are shared, not copied).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.func import functional_call

from .peer import Recording

if TYPE_CHECKING:
    from .model import PEERLM

__all__ = ["Branch", "SHARED", "snapshot", "branch_state", "pop_branches", "mixture_log_probs"]

# State shared by every branch (the expert grid and what belongs to it), never copied.
SHARED = ("expert_u", "expert_v", "row_keys", "frozen_row_keys", "col_keys", "anchors", "background", "background_docs")
_TENSOR = "branch.{i}.{name}"  # dense_state_dict keys of branch i's tensors
_ROWS = "branch_rows.{i}.{layer}"  # and of the rows each PEER layer shows it


@dataclass
class Branch:
    """The dense weights of an earlier cycle and, per PEER layer, the grid rows it sees."""

    tensors: dict[str, Tensor]  # state_dict names -> frozen tensors
    rows: dict[str, int]  # PEER layer name -> rows [0, rows) of the grid


@torch.no_grad()
def snapshot(model: PEERLM) -> Branch:
    """The model's current dense weights (copied) and grid rows, as a frozen branch."""
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith(SHARED)}
    return Branch(tensors, {name: layer.n_rows for name, layer in model.peer_layers().items()})


def branch_state(branches: list[Branch]) -> dict[str, Tensor]:
    """The branches as flat named tensors (stored with the version's dense weights)."""
    out: dict[str, Tensor] = {}
    for i, b in enumerate(branches):
        out.update({_TENSOR.format(i=i, name=k): v for k, v in b.tensors.items()})
        out.update({_ROWS.format(i=i, layer=n): torch.tensor(r, dtype=torch.int64) for n, r in b.rows.items()})
    return out


def pop_branches(dense: dict[str, Tensor]) -> list[Branch]:
    """Take the branches out of a version's dense weights (none in versions made without)."""
    found: dict[int, Branch] = {}
    for key in [k for k in dense if k.startswith(("branch.", "branch_rows."))]:
        kind, i, name = key.split(".", 2)
        b = found.setdefault(int(i), Branch({}, {}))
        value = dense.pop(key)
        if kind == "branch":
            b.tensors[name] = value
        else:
            b.rows[name] = int(value)
    return [found[i] for i in sorted(found)]


@contextmanager
def _as_branch(model: PEERLM, branch: Branch | None, recs: dict[str, Recording | None]) -> Iterator[None]:
    """PEER layers show only ``branch``'s rows (all rows for the live weights, None) and
    record into ``recs``."""
    layers = model.peer_layers()
    saved = {n: (layer.visible_rows, layer._recording) for n, layer in layers.items()}
    try:
        for n, layer in layers.items():
            layer.visible_rows, layer._recording = None if branch is None else branch.rows.get(n), recs[n]
        yield
    finally:
        for n, layer in layers.items():
            layer.visible_rows, layer._recording = saved[n]


def _branch_recordings(outer: dict[str, Recording | None], live: bool) -> dict[str, Recording | None]:
    """Per layer, what one branch records under an outer recording: its own router usage
    (weighted into the outer one by the branch's posterior afterwards); queries and retrieval
    counts only for the live weights (they seed its keys, anchors and background)."""
    out: dict[str, Recording | None] = {}
    for n, r in outer.items():
        if r is None or (r.usage is None and not live):
            out[n] = None
        else:
            out[n] = Recording(queries=r.queries if live else None, counts=r.counts if live else None,
                               usage=None if r.usage is None else torch.zeros_like(r.usage))
    return out


def mixture_log_probs(model: PEERLM, idx: Tensor) -> Tensor:
    """idx: (B, L) -> (B, L, V) log-probabilities of the posterior mixture of every frozen
    branch and the live weights (weights at position t from tokens 1..t of idx).

    Runs in eval mode. Router usage recorded meanwhile is the mixture's: each branch's, times its mean
    posterior weight over this batch's predicted tokens."""
    outer = {n: layer._recording for n, layer in model.peer_layers().items()}
    lps, recs = [], []
    was_training = model.training
    model.eval()  # a prediction: BatchNorm statistics (frozen branches' above all) are only read
    try:
        for b in [*model.branches, None]:  # None: the live weights
            recs.append(_branch_recordings(outer, live=b is None))
            with _as_branch(model, b, recs[-1]):
                logits, _ = (model(idx, mixture=False) if b is None
                             else functional_call(model, b.tensors, (idx,), {"mixture": False}))
            lps.append(logits.float().log_softmax(-1))
    finally:
        model.train(was_training)
    lp = torch.stack(lps)  # (K, B, L, V)
    nxt = idx[:, 1:]  # (B, L-1) the tokens each position's prediction is judged on
    seen = lp[:, :, :-1].gather(-1, nxt.expand(lp.shape[0], *nxt.shape).unsqueeze(-1)).squeeze(-1)  # (K, B, L-1)
    seen = seen.masked_fill(nxt == model.config.pad_id, 0.0)
    prefix = torch.nn.functional.pad(seen.cumsum(-1), (1, 0))  # (K, B, L): log p_b(idx[:, 1:t+1])
    w = prefix.log_softmax(0)  # (K, B, L) log posterior, uniform prior
    _add_usage(outer, recs, w, idx != model.config.pad_id)
    return torch.logsumexp(w.unsqueeze(-1) + lp, dim=0).to(logits.dtype)  # (B, L, V)


@torch.no_grad()
def _add_usage(outer: dict[str, Recording | None], recs: list[dict[str, Recording | None]], w: Tensor, real: Tensor) -> None:
    """outer usage += sum over branches of (mean posterior weight over the ``real`` (B, L)
    positions) x (the branch's usage). w: (K, B, L) log weights."""
    if not any(r is not None and r.usage is not None for r in outer.values()):
        return
    share = (w.exp() * real).sum(dim=(1, 2)) / real.sum().clamp_min(1)  # (K,)
    for n, r in outer.items():
        if r is not None and r.usage is not None:
            for k, branch_recs in enumerate(recs):
                r.usage += share[k].to(r.usage.dtype) * branch_recs[n].usage  # type: ignore[union-attr,operator]
