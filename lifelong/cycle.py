"""One growth cycle end to end: ingest -> grow -> train -> evaluate -> commit (-> guard).

The single function :func:`run_cycle` is what the CLI verb, the tests and the scheduler
all call. The stream's cursor is committed inside the new version (never before), so a
crash at any point re-reads the same data on the next cycle and nothing is counted twice.
"""

from __future__ import annotations

import dataclasses
import math
import time
from types import SimpleNamespace
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from expert_store import ExpertStore
from streams import StreamRegistry

from .checkpoint import best_device, checkout_model, commit_model
from .config import TrainConfig, require
from .errors import LifelongError
from .evaluate import continual_metrics, loss_matrix, usage_stats
from .model import PEERLM
from .monitor import Monitor
from .records import CycleRow, Lease, create_tables, holder_name, utcnow
from .train import evaluate_loss, train

__all__ = ["CycleConfig", "CycleResult", "run_cycle", "NothingPendingError", "CycleInterrupted", "POLICIES", "init_new_keys"]

POLICIES = ("full", "freeze-experts", "freeze-all")


class NothingPendingError(LifelongError):
    """The stream has no new data relative to HEAD's cursor."""

    hint = "add data to the stream's source, or check `lifelong stream show NAME`"


class CycleInterrupted(LifelongError):
    """A stop was requested (SIGTERM/SIGINT) before the commit: no version was written."""


@dataclass
class CycleConfig:
    policy: str = "freeze-experts"  # full | freeze-experts | freeze-all
    grow_rows: int = 8  # rows added to every PEER layer (ignored by `full`)
    token_budget: int | None = 1_000_000  # new tokens taken from the stream per cycle
    epochs: float = 1.0  # passes over the new data (sets the step count unless train.steps is forced)
    replay_ratio: float = 0.0  # share of each batch replayed from earlier streams
    distill_weight: float = 0.0  # KL to the previous version on replayed rows (needs replay)
    distill_temperature: float = 1.0
    key_init: str = "queries"  # new row keys from the new data's queries, or "random"
    eval_tokens: int = 32_768  # held-out tokens per stream (a stable prefix)
    max_forgetting: float | None = None  # guard, nats: above it the version becomes a candidate
    seed: int = 0
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if isinstance(self.train, dict):
            self.train = TrainConfig(**self.train)
        require(self.policy in POLICIES, "policy", f"must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        require(isinstance(self.grow_rows, int) and self.grow_rows > 0, "grow_rows", f"must be a positive integer, got {self.grow_rows!r}")
        require(0.0 <= self.replay_ratio < 1.0, "replay_ratio", f"must be in [0, 1), got {self.replay_ratio}")
        require(self.distill_weight >= 0, "distill_weight", "must be >= 0")
        require(self.key_init in ("queries", "random"), "key_init", f"must be 'queries' or 'random', got {self.key_init!r}")
        require(self.epochs > 0, "epochs", "must be positive")
        require(self.eval_tokens > 0, "eval_tokens", "must be positive")


@dataclass
class CycleResult:
    cycle_id: int
    stream: str
    policy: str
    version: int
    parent: int | None
    ref: str  # "HEAD", or the candidate ref when the guard failed
    metrics: dict[str, Any]
    seconds: float

    @property
    def accepted(self) -> bool:
        return self.ref == "HEAD"


def _to_blocks(tokens: np.ndarray, block_len: int, pad_id: int, seed: int | None = None) -> np.ndarray:
    from streams import pack_blocks

    if tokens.size == 0:
        return np.zeros((0, block_len + 1), dtype=np.int64)
    return pack_blocks(tokens, block_len, pad_id=pad_id, seed=seed).astype(np.int64)


@torch.no_grad()
def init_new_keys(model: PEERLM, blocks: np.ndarray, rows: int, *, seed: int = 0, max_queries: int = 16384) -> dict[str, torch.Tensor]:
    """Row keys for a growth of ``rows`` rows per layer from the new data's query statistics.

    k-means (a few Lloyd steps) on the row halves ``q1`` of the new data's queries; each new
    key points at a cluster centre, scaled to the largest existing row-key norm so that new
    experts win for queries of the new domain without outranking old keys everywhere.
    """
    layers = model.peer_layers()
    for layer in layers.values():
        layer.capture = []
    try:
        evaluate_loss(model, blocks, batch_size=8, max_batches=max(1, max_queries // (blocks.shape[1] * 8)))
        out = {}
        g = torch.Generator().manual_seed(seed)
        for name, layer in layers.items():
            q = torch.cat(layer.capture or [])  # (Q, h, dk)
            half = q.shape[-1] // 2
            q1 = q[..., :half].reshape(-1, half).float().cpu()  # (Q*h, dk/2)
            q1 = q1[torch.randperm(q1.shape[0], generator=g)[:max_queries]]
            centres = q1[torch.randperm(q1.shape[0], generator=g)[:rows]].clone()
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
    finally:
        for layer in layers.values():
            layer.capture = None


def apply_policy(model: PEERLM, cfg: CycleConfig, new_blocks: np.ndarray) -> dict[str, Any]:
    """Grow and freeze according to the policy; returns what was done."""
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


def _mixed_batches(new: np.ndarray, replay: np.ndarray | None, batch_size: int, ratio: float, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(tokens (B, L+1), replay mask (B,)) with round(ratio * B) replayed rows per batch."""
    rng = np.random.default_rng(seed)
    n_replay = int(round(ratio * batch_size)) if replay is not None and len(replay) else 0
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


def _consumed_tokens(chain: list[Any]) -> dict[str, int]:
    """Training tokens committed per stream along a version chain (from cycle metrics)."""
    out: dict[str, int] = {}
    for v in chain:
        s = v.metrics.get("stream")
        if s:
            out[s] = out.get(s, 0) + int(v.metrics.get("new_tokens", 0))
    return out


def _stream_order(chain_metrics: list[dict[str, Any]], cursors: dict[str, Any], stream: str) -> list[str]:
    seen: list[str] = []
    for m in chain_metrics:
        for s in m.get("losses", {}):
            if s not in seen:
                seen.append(s)
    for s in list(cursors) + [stream]:
        if s not in seen:
            seen.append(s)
    return seen


def run_cycle(
    store: ExpertStore,
    registry: StreamRegistry,
    stream: str,
    cfg: CycleConfig | None = None,
    *,
    device: str | torch.device | None = None,
    monitor: Monitor | None = None,
    progress: bool = True,
    should_stop: Callable[[], bool] | None = None,
    wait_s: float = 0.0,
    holder: str | None = None,
    log: Callable[[str], None] = print,
) -> CycleResult:
    """Run one growth cycle on ``stream`` and commit its version (HEAD, or a candidate ref)."""
    cfg = cfg or CycleConfig()
    t_start = time.perf_counter()
    registry.get(stream)  # unknown stream: clear error before anything else
    create_tables(store.engine)
    holder = holder or holder_name()
    with Lease(store.engine, "cycle", holder=holder, wait_s=wait_s) as lease:
        parent = store.head()
        if parent is None:
            raise LifelongError(f"the store at {store.path} has no HEAD version")
        pinfo = store.version(parent)
        cursor = pinfo.cursors.get(stream)
        data = registry.ingest(stream, cursor, cfg.token_budget)
        if data.train_docs == 0:
            raise NothingPendingError(f"stream '{stream}' has nothing pending after version {parent}; no version was made")
        with store.engine.begin() as conn:
            # We hold the lease, so no other cycle runs: a 'running' row is one whose process
            # died holding it (SIGKILL, power loss) before recording its outcome.
            conn.execute(
                CycleRow.__table__.update()
                .where(CycleRow.status == "running")
                .values(status="abandoned", finished_at=utcnow(), detail={"error": "its process died before recording an outcome"})
            )
            cycle_id = conn.execute(
                CycleRow.__table__.insert().values(
                    stream=stream, policy=cfg.policy, status="running", started_at=utcnow(), parent_version=parent, holder=holder
                )
            ).inserted_primary_key[0]

        def finish(status: str, version: int | None = None, detail: dict[str, Any] | None = None) -> None:
            with store.engine.begin() as conn:
                conn.execute(
                    CycleRow.__table__.update()
                    .where(CycleRow.id == cycle_id)
                    .values(status=status, finished_at=utcnow(), version=version, detail=detail)
                )

        try:
            result = _cycle_body(store, registry, stream, cfg, parent, pinfo, data, cycle_id, device, monitor, progress, should_stop, lease, log)
        except BaseException as exc:
            finish("interrupted" if isinstance(exc, (CycleInterrupted, KeyboardInterrupt)) else "failed", detail={"error": str(exc)[:2000]})
            raise
        finish("committed" if result.accepted else "candidate", result.version, {"ref": result.ref})
        registry.clear_staged(stream)
    result.seconds = time.perf_counter() - t_start
    return result


def _cycle_body(store, registry, stream, cfg, parent, pinfo, data, cycle_id, device, monitor, progress, should_stop, lease, log) -> CycleResult:
    device = torch.device(device) if device is not None else best_device()
    model, _ = checkout_model(store, parent, device=device)
    mc = model.config
    new_blocks = data.blocks(mc.block_size, seed=cfg.seed)
    new_blocks = new_blocks.astype(np.int64)
    log(f"cycle {cycle_id}: stream '{stream}', {data.train_docs} docs / {data.train_token_count} tokens new "
        f"({len(new_blocks)} blocks), policy {cfg.policy}, parent version {parent}")
    held_new = _to_blocks(registry.heldout(stream, max_tokens=cfg.eval_tokens).tokens, mc.block_size, mc.pad_id)
    loss_before = evaluate_loss(model, held_new) if len(held_new) else None  # parent on the new stream
    torch.manual_seed(cfg.seed)
    policy_info = apply_policy(model, cfg, new_blocks)

    replay_blocks = None
    teacher = None
    old_streams = [s for s in pinfo.cursors if s != stream]
    if cfg.replay_ratio > 0 and old_streams:
        per_stream = max(1, int(cfg.replay_ratio * data.train_token_count / len(old_streams)))
        consumed = _consumed_tokens(store.log(parent))
        # Streams are read in a deterministic order, so the first `consumed` tokens from the
        # start are exactly data already trained on: replay never touches uncommitted data.
        parts = [
            registry.ingest(s, None, min(per_stream, consumed.get(s, 0)), use_staged=False).train_tokens
            for s in old_streams
            if consumed.get(s, 0) > 0
        ]
        replay_blocks = _to_blocks(np.concatenate(parts), mc.block_size, mc.pad_id, cfg.seed) if parts else None
        if cfg.distill_weight > 0:
            teacher, _ = checkout_model(store, parent, device=device)
            teacher.eval()

    tcfg = cfg.train
    n_new = tcfg.batch_size - (int(round(cfg.replay_ratio * tcfg.batch_size)) if replay_blocks is not None else 0)
    steps = max(1, math.ceil(cfg.epochs * len(new_blocks) / max(1, n_new)))
    tcfg = dataclasses.replace(tcfg, steps=steps, warmup_steps=min(tcfg.warmup_steps, max(1, steps // 10)))
    step0 = int(pinfo.metrics.get("global_step", 0))
    last_renew = [time.monotonic()]

    def on_step(step: int, loss: float, lr: float) -> None:
        if monitor is not None:
            monitor.train_step(step0 + step, loss, lr)
        if time.monotonic() - last_renew[0] > lease.ttl_s / 3:
            lease.renew()
            last_renew[0] = time.monotonic()

    stopped = [False]

    def stop() -> bool:
        stopped[0] = stopped[0] or bool(should_stop and should_stop())
        return stopped[0]

    parent_optimizer = store.load_optimizer(parent, device) if pinfo.optimizer_hash else None
    result = train(
        model,
        _mixed_batches(new_blocks, replay_blocks, tcfg.batch_size, cfg.replay_ratio, cfg.seed),
        tcfg,
        on_step=on_step,
        progress=progress,
        should_stop=stop,
        teacher=teacher,
        distill_weight=cfg.distill_weight,
        distill_temperature=cfg.distill_temperature,
        optimizer_state=parent_optimizer,
    )
    if stop():
        raise CycleInterrupted(f"cycle {cycle_id} stopped after {result.steps} of {steps} steps; no version was committed")

    # Evaluate on every stream seen so far: one row of the loss matrix.
    chain = list(reversed(store.log(parent)))
    order = _stream_order([v.metrics for v in chain], pinfo.cursors, stream)
    losses: dict[str, float | None] = {}
    usage_blocks = None
    for s in order:
        held = registry.heldout(s, max_tokens=cfg.eval_tokens)
        blocks = _to_blocks(held.tokens, mc.block_size, mc.pad_id)
        losses[s] = evaluate_loss(model, blocks) if len(blocks) else None
        if s == stream and len(blocks):
            usage_blocks = blocks
    metrics: dict[str, Any] = {
        "stream": stream,
        "policy": cfg.policy,
        "cycle": cycle_id,
        "losses": losses,
        "loss_before": loss_before,
        "baseline_loss": math.log(mc.vocab_size),
    }
    matrix = loss_matrix(chain + [SimpleNamespace(id=-1, metrics=metrics)])
    metrics.update(continual_metrics(matrix))
    counts: dict[str, torch.Tensor] = {}
    usage = usage_stats(model, usage_blocks if usage_blocks is not None else new_blocks[:32], counts=counts)
    metrics.update(
        usage=usage,
        train_loss=result.final_loss,
        steps=result.steps,
        tokens_per_s=result.tokens_per_s,
        new_docs=data.train_docs,
        new_tokens=data.train_token_count,
        bad_rows=data.bad_rows,
        global_step=step0 + result.steps,
        resumed_optimizer=result.resumed_optimizer,
        experts=sum(l.num_experts for l in model.peer_layers().values()),
        **policy_info,
    )

    ref = "HEAD"
    worst = max(metrics["forgetting"].values(), default=0.0)
    if cfg.max_forgetting is not None and worst > cfg.max_forgetting:
        ref = f"candidate/{cycle_id}"
    if stop():
        raise CycleInterrupted(f"cycle {cycle_id} stopped before its commit; no version was committed")
    cursors = {**pinfo.cursors, stream: data.new_cursor}
    info = commit_model(
        store,
        model,
        message=f"cycle {cycle_id}: {stream} ({cfg.policy}, +{policy_info['grown_rows']} rows/layer)",
        parent=parent,
        metrics=metrics,
        cursors=cursors,
        ref=ref,
        created_by=f"cycle:{cycle_id}",
        optimizer=result.optimizer_state,
    )
    if ref != "HEAD":
        log(f"guard: forgetting {worst:.3f} nats > max_forgetting {cfg.max_forgetting}: version {info.id} kept as "
            f"'{ref}', HEAD stays at {parent} (automatic rollback)")
    if monitor is not None:  # the version is committed: a logging failure must not fail the cycle
        try:
            prompt = torch.from_numpy((usage_blocks if usage_blocks is not None else new_blocks)[:1, :16]).long().to(device)
            out = model.generate(prompt, 96, temperature=0.8, top_k=20, generator=torch.Generator(device).manual_seed(cfg.seed))
            sample = bytes(t for t in out[0].tolist() if t < 256).decode("utf-8", errors="replace")
            monitor.cycle(cycle_id, metrics, model, usage_counts=counts, sample=sample)
        except Exception as exc:  # noqa: BLE001
            log(f"warning: TensorBoard logging of cycle {cycle_id} failed: {exc}")
    return CycleResult(cycle_id, stream, cfg.policy, info.id, parent, ref, metrics, 0.0)
