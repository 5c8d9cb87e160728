"""The training loop, written out in one function, and the batches it eats."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from .config import TrainConfig
from .errors import DataError
from .evaluate import evaluate_loss
from .model import PEERLM
from .optim import RowAdam
from .peer import recording

if TYPE_CHECKING:
    from .distributed import Dist

__all__ = ["train", "random_batches", "mixed_batches", "replay_rows", "TrainResult", "lr_factor"]


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    losses: list[float] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0
    eval_losses: list[tuple[int, float]] = field(default_factory=list)
    config: TrainConfig | None = None  # the configuration it ran with
    replayed_rows: int = 0  # batch rows marked as replay
    distilled_rows: int = 0  # replayed rows that also paid the distillation loss
    optimizer_state: dict[str, Tensor] = field(default_factory=dict)  # flat, safetensors-ready
    resumed_optimizer: bool = False

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def random_batches(blocks: np.ndarray, batch_size: int, seed: int) -> Iterator[Tensor]:
    """Endless (B, L+1) batches drawn from token blocks (n, L+1) in a seeded shuffled order."""
    if len(blocks) == 0:
        raise DataError("no training blocks: the data is too small for one block")
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(blocks))
        if len(order) < batch_size:
            order = rng.integers(0, len(blocks), batch_size)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield torch.from_numpy(np.ascontiguousarray(blocks[order[i : i + batch_size]])).long()


def replay_rows(batch_size: int, ratio: float, replay: np.ndarray | None) -> int:
    """Rows of each batch taken from ``replay``: round(ratio * B), at least one row left for
    new data, none when there is no replay data."""
    if replay is None or len(replay) == 0:
        return 0
    return min(batch_size - 1, int(round(ratio * batch_size)))


def mixed_batches(new: np.ndarray, replay: np.ndarray | None, batch_size: int, ratio: float, seed: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless (tokens (B, L+1), replay mask (B,)): :func:`replay_rows` rows of each batch
    drawn from ``replay``, the rest from ``new`` in a seeded shuffled order."""
    if len(new) == 0:
        raise DataError("no training blocks: the data is too small for one block")
    rng = np.random.default_rng(seed)
    n_replay = replay_rows(batch_size, ratio, replay)
    n_new = batch_size - n_replay
    while True:
        order = rng.permutation(len(new))
        for i in range(0, max(1, len(order) - n_new + 1), n_new):
            rows = [new[order[i : i + n_new]]]
            if n_replay:
                rows.append(replay[rng.integers(0, len(replay), n_replay)])  # type: ignore[index]
            batch = np.concatenate(rows)
            mask = np.zeros(len(batch), dtype=bool)
            mask[len(rows[0]) :] = True
            yield torch.from_numpy(batch).long(), torch.from_numpy(mask)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio``."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train(
    model: PEERLM,
    batches: Iterator[Tensor],
    cfg: TrainConfig,
    *,
    eval_blocks: np.ndarray | None = None,
    on_step: Callable[[int, float, float], None] | None = None,
    step_offset: int = 0,
    progress: bool = True,
    should_stop: Callable[[], bool] | None = None,
    teacher: PEERLM | None = None,
    distill_weight: float = 0.0,
    distill_temperature: float = 1.0,
    optimizer_state: dict[str, Tensor] | None = None,
    after_step: Callable[[], object] | None = None,
    select_rows: Callable[[list[Tensor]], list[Tensor | None]] | None = None,
    dist: Dist | None = None,
) -> TrainResult:
    """Train ``model`` for ``cfg.steps`` steps on (B, L+1) token batches.

    Dense, query and key parameters: AdamW (no weight decay on norms, biases and keys).
    Expert tables: :class:`RowAdam`, touching only the rows each batch retrieved.
    Only trainable parts get optimizer state: frozen keys are buffers or have
    ``requires_grad=False``, frozen experts lie below each layer's ``trainable_start``.

    ``batches`` yields (B, L+1) tensors, or ``(tokens, replay)`` pairs where ``replay`` (B,)
    marks replayed rows: with a ``teacher`` (the previous version) and ``distill_weight`` > 0,
    those rows also pay ``distill_weight * T^2 * KL(teacher || model)`` at temperature T.

    ``on_step(step_offset + step, loss, lr)`` is called after every step (e.g.
    :meth:`lifelong.monitor.Monitor.train_step` with the version's global step as offset).

    ``select_rows`` (sparse memory finetuning) gets each batch's per-layer retrieval counts
    (N,) and returns the expert ids each layer may update in that step.

    ``optimizer_state`` (a previous :attr:`TrainResult.optimizer_state`) resumes the optimizers:
    the expert rows' state always (rows still trainable keep theirs), AdamW's only when the
    trainable parameters have the same shapes (after growth they do not: AdamW starts fresh).

    ``dist`` (:class:`lifelong.distributed.Dist`): every rank passes the same global batches
    and trains on its share of each; the update is the one a single process would make on the
    whole batch (up to float summation order). ``TrainResult`` counts global tokens and rows.
    """
    device = next(model.parameters()).device
    groups = model.param_groups()
    dense = groups["dense"] + groups["query"]
    decay = [p for p in dense if p.ndim >= 2]
    no_decay = [p for p in dense if p.ndim < 2] + groups["key"]
    param_groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    adamw = torch.optim.AdamW(param_groups, lr=cfg.lr, betas=(0.9, 0.95)) if param_groups else None
    rows = RowAdam(groups["expert"], lr=cfg.expert_lr)
    clip_params = [p for g in param_groups for p in g["params"]]
    resumed = _load_optimizers(adamw, rows, optimizer_state or {})
    forward = dist.wrap(model) if dist is not None else model  # DDP averages the dense gradients

    model.train()
    result = TrainResult(steps=0, final_loss=float("nan"), resumed_optimizer=resumed, config=cfg)
    start = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc="train", unit="step", disable=not progress, leave=False)
    for step in bar:
        if should_stop is not None and (should_stop() if dist is None else dist.any(should_stop())):
            break
        factor = lr_factor(step, cfg)
        if adamw is not None:
            for g in adamw.param_groups:
                g["lr"] = cfg.lr * factor
        rows.lr = cfg.expert_lr * factor

        item = next(batches)
        batch, replay = item if isinstance(item, tuple) else (item, None)
        n_replay = int(replay.sum()) if replay is not None else 0
        tokens = batch[:, 1:].numel()
        if dist is not None:  # this rank's share; losses are sums over the global counts
            targets = int((batch[:, 1:] != model.config.pad_id).sum())
            replay_tokens = n_replay * (batch.shape[1] - 1)
            batch, replay = dist.shard(batch), dist.shard(replay) if replay is not None else None
        batch = batch.to(device)  # (B, L+1); (B/P, L+1) on each of P ranks
        with recording(model.peer_layers(), counts=True) if select_rows is not None else nullcontext({}) as recs:
            if dist is None:
                logits, loss = model(batch[:, :-1], batch[:, 1:])
            else:
                with dist.sharded():
                    logits, _ = forward(batch[:, :-1])
                ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), ignore_index=model.config.pad_id,
                                     reduction="sum")
                loss = ce * (dist.world / max(1, targets))  # DDP's mean over ranks makes it the global mean
        result.replayed_rows += n_replay
        local_replay = n_replay if dist is None else (int(replay.sum()) if replay is not None else 0)
        if teacher is not None and distill_weight > 0 and local_replay:
            replay = replay.to(device)  # type: ignore[union-attr]
            result.distilled_rows += n_replay if dist is None else 0
            with torch.no_grad():
                teacher_logits, _ = teacher(batch[replay][:, :-1])  # (R, L, V)
            t = distill_temperature
            vocab = logits.shape[-1]
            kl = F.kl_div(
                F.log_softmax(logits[replay].reshape(-1, vocab) / t, -1),
                F.log_softmax(teacher_logits.reshape(-1, vocab) / t, -1),
                log_target=True,
                reduction="batchmean" if dist is None else "sum",
            )  # per token
            if dist is not None:
                kl = kl * (dist.world / replay_tokens)
            loss = loss + distill_weight * t * t * kl
        if dist is not None and teacher is not None and distill_weight > 0:
            result.distilled_rows += n_replay
        if adamw is not None:
            adamw.zero_grad(set_to_none=True)
        loss.backward()
        if dist is not None:
            dist.merge_row_grads(groups["expert"])
            if select_rows is not None:
                dist.sum_recordings(recs)
        if clip_params and cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(clip_params, cfg.grad_clip)
        if adamw is not None:
            adamw.step()
        rows.step(select_rows([r.counts for r in recs.values()]) if select_rows is not None else None)
        if after_step is not None:  # e.g. routing isolation's projection of the new keys
            after_step()

        value = float(loss.detach()) if dist is None else float(dist.sum_(loss.detach().clone())) / dist.world
        if not math.isfinite(value):
            raise FloatingPointError(f"training loss became {value} at step {step}; lower the learning rate")
        result.losses.append(value)
        result.tokens += tokens
        result.steps = step + 1
        bar.set_postfix(loss=f"{value:.3f}")
        if on_step is not None:
            on_step(step_offset + step, value, cfg.lr * factor)
        if eval_blocks is not None and cfg.eval_every and (step + 1) % cfg.eval_every == 0:
            result.eval_losses.append((step + 1, _eval(model, eval_blocks, cfg, dist)))
    bar.close()
    result.seconds = time.perf_counter() - start
    result.final_loss = float(np.mean(result.losses[-10:])) if result.losses else float("nan")
    if eval_blocks is not None and (not result.eval_losses or result.eval_losses[-1][0] != result.steps):
        result.eval_losses.append((result.steps, _eval(model, eval_blocks, cfg, dist)))
    result.optimizer_state = _save_optimizers(adamw, rows)
    return result


def _eval(model: PEERLM, blocks: np.ndarray, cfg: TrainConfig, dist: Dist | None) -> float:
    if dist is None:
        return evaluate_loss(model, blocks, cfg.batch_size, cfg.eval_batches)
    return dist.evaluate_loss(model, blocks, cfg.batch_size, cfg.eval_batches)


def _save_optimizers(adamw: torch.optim.Optimizer | None, rows: RowAdam) -> dict[str, Tensor]:
    out = {f"rows.{k}": v for k, v in rows.state_dict().items()}
    if adamw is not None:
        for i, st in adamw.state_dict()["state"].items():
            for k, v in st.items():
                out[f"adamw.{i}.{k}"] = torch.as_tensor(v).detach().clone()
    return out


def _load_optimizers(adamw: torch.optim.Optimizer | None, rows: RowAdam, flat: dict[str, Tensor]) -> bool:
    """Load what fits; returns True when AdamW's state was resumed too."""
    rows.load_state_dict({k[5:]: v for k, v in flat.items() if k.startswith("rows.")})
    if adamw is None:
        return False
    sd = adamw.state_dict()
    params = [p for g in adamw.param_groups for p in g["params"]]
    state: dict[int, dict[str, Tensor]] = {}
    for key, value in flat.items():
        if key.startswith("adamw."):
            _, i, name = key.split(".", 2)
            state.setdefault(int(i), {})[name] = value
    if sorted(state) != list(range(len(params))):
        return False
    for i, p in enumerate(params):
        if state[i]["exp_avg"].shape != p.shape:
            return False
    sd["state"] = {i: {k: v.to(p.device) if k != "step" else v for k, v in state[i].items()} for i, p in enumerate(params)}
    adamw.load_state_dict(sd)
    return True
