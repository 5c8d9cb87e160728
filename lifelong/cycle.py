"""One growth cycle end to end: ingest -> grow -> train -> evaluate -> commit -> guard.

The single function :func:`run_cycle` is what the CLI verb, the tests and the scheduler
all call; it reads top to bottom in that order, each step one call into the module that
owns it (streams, :mod:`~lifelong.growth`, :mod:`~lifelong.train`,
:mod:`~lifelong.evaluate`, :mod:`~lifelong.checkpoint`). The stream's cursor is committed
inside the new version (never before), so a crash at any point re-reads the same data on
the next cycle and nothing is counted twice.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import numpy as np
import torch
from sqlalchemy.exc import SQLAlchemyError

from expert_store import ConflictError, ExpertStore, VersionInfo
from streams import StreamError, StreamRegistry, pack_blocks

from .checkpoint import checkout_model, commit_model
from .config import CycleConfig, config_to_dict
from .errors import LifelongError
from .evaluate import (LossMatrix, continual_metrics, evaluate_loss, expert_usage, experts_when_trained, heldout_blocks, loss_matrix,
                       routing_retention, stream_order)
from .growth import Growth, apply_policy, record_anchors, record_background
from .model import PEERLM, resolve_device, sample_text
from .monitor import Monitor
from .peer import recording
from .records import Lease, committed_outcome, finish_cycle, holder_name, start_cycle
from .train import TrainResult, mixed_batches, replay_rows, train

if TYPE_CHECKING:
    from .distributed import Dist

_T = TypeVar("_T")

__all__ = ["CycleResult", "run_cycle", "NothingPendingError", "CycleInterrupted", "HeadMovedError"]


class NothingPendingError(LifelongError):
    """The stream has no new data relative to HEAD's cursor."""

    hint = "add data to the stream's source, or check `lifelong stream show NAME`"


class CycleInterrupted(LifelongError):
    """A stop was requested (SIGTERM/SIGINT) before the commit: no version was written."""


class HeadMovedError(LifelongError):
    """HEAD moved while the cycle ran (a rollback): its compare-and-swap lost, so its version
    was kept as the ref :attr:`ref` instead, and HEAD (with the stream's cursor) stayed put."""

    def __init__(self, message: str, *, cycle_id: int, version: int, ref: str, head: int | None):
        super().__init__(message)
        self.cycle_id, self.version, self.ref, self.head = cycle_id, version, ref, head


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


@dataclass
class _Cycle:
    """What the steps of one running cycle share."""

    id: int
    store: ExpertStore
    registry: StreamRegistry
    stream: str
    cfg: CycleConfig
    parent: VersionInfo
    device: torch.device
    should_stop: Callable[[], bool] | None
    monitor: Monitor | None
    progress: bool
    log: Callable[[str], None]
    dist: Dist | None = None  # several processes (lifelong.distributed); None: this one alone


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
    dist: Dist | None = None,
) -> CycleResult:
    """Run one growth cycle on ``stream`` and commit its version (HEAD, or a candidate ref).

    HEAD moved while it ran (a rollback): the version is kept as ``candidate/<cycle id>``, HEAD
    and the stream's cursor stay, and :class:`HeadMovedError` says how to adopt it.

    ``dist`` (every rank of a ``torchrun`` calls this with its :class:`~lifelong.distributed.Dist`):
    rank 0 alone takes the lease, ingests, writes the cycle row and commits; every rank
    trains on its share of each batch and evaluates its share of the held-out data."""
    cfg = cfg or CycleConfig()
    t_start = time.perf_counter()
    registry.get(stream)  # unknown stream: clear error before anything else
    holder = holder or holder_name()
    if dist is not None and should_stop is not None:  # a stop on any rank stops every rank at the same point
        local_stop = should_stop
        should_stop = lambda: dist.any(local_stop())  # noqa: E731
    if dist is not None:  # every rank must see rank 0's objects (one directory on every host)
        dist.check_shared_store(store)
    with _lease(store, holder, wait_s, dist, log) as lease:
        parent, data, cfg = _on_main(dist, lambda: _prepare(store, registry, stream, cfg, log))  # ingest
        with _cycle_row(store, stream, cfg, parent.id, holder, dist, log) as row:
            c = _Cycle(row.id, store, registry, stream, cfg, parent, resolve_device(device), should_stop, monitor, progress, log, dist)
            if dist is not None:  # bad layouts fail here, before any training
                from .distributed import check_layout

                check_layout(dist.world, cfg.train.batch_size, parent.config.get("model", {}).get("d_model"), dist.expert_parallel)
            # expert parallel: each rank reads only its columns of the expert tables
            model, origin = checkout_model(store, parent.id, device=c.device, expert_slice=dist.expert_slice if dist else None)
            if cfg.policy == "branch" and len(model.branches) >= cfg.max_branches:
                log(f"cycle {c.id}: version {parent.id} has {len(model.branches)} branches (--max-branches {cfg.max_branches}): "
                    "this cycle runs freeze-all (only new rows train, with routing isolation) instead of adding one, "
                    "so that prediction cost stays bounded")
                cfg = c.cfg = dataclasses.replace(cfg, policy="freeze-all")
            if model.branches and cfg.policy in ("full", "sparse"):
                log(f"warning: version {parent.id} has {len(model.branches)} frozen branches, and policy {cfg.policy} trains "
                    "the experts they share: their predictions of earlier streams will change")
            mc = model.config
            new_blocks = data.blocks(mc.block_size, seed=cfg.seed).astype(np.int64)
            log(f"cycle {c.id}: stream '{stream}', {data.train_docs} docs / {data.train_token_count} tokens new "
                f"({len(new_blocks)} blocks), policy {cfg.policy}, parent version {parent.id}")
            held_new = heldout_blocks(registry, stream, mc.block_size, mc.pad_id, cfg.eval_tokens)
            loss_before = _eval_loss(c, model, held_new) if len(held_new) else None  # the parent on the new stream

            torch.manual_seed(cfg.seed)
            growth = apply_policy(model, cfg, new_blocks)  # grow
            if growth.info["grown_rows"] and cfg.routing_isolation and growth.isolation is None and cfg.policy != "branch":
                log(f"cycle {c.id}: version {parent.id} has no query anchors (made before them, or by a dense model): "
                    "growth without routing isolation")

            trained = _train(c, model, new_blocks, data.train_token_count, growth)  # train
            if should_stop is not None and should_stop():
                raise CycleInterrupted(f"cycle {c.id} stopped after {trained.steps} steps; no version was committed")

            usage_blocks = held_new if len(held_new) else new_blocks[:32]
            metrics, matrix, usage_counts = _evaluate(c, model, held_new, loss_before, usage_blocks)  # evaluate
            metrics.update(
                train_loss=trained.final_loss, steps=trained.steps, tokens_per_s=trained.tokens_per_s,
                replayed_rows=trained.replayed_rows, distilled_rows=trained.distilled_rows, new_docs=data.train_docs,
                new_tokens=data.train_token_count, bad_rows=data.bad_rows,
                global_step=int(parent.metrics.get("global_step", 0)) + trained.steps, resumed_optimizer=trained.resumed_optimizer,
                experts=sum(layer.num_experts for layer in model.peer_layers().values()), branches=len(model.branches),
                **growth.info,
            )
            if growth.isolation is not None:
                metrics["isolation_violations"] = growth.isolation.violations()
            # This stream's queries and expert usage, kept for later cycles (isolation, sparse) with no text.
            metrics["anchors"] = record_anchors(model, new_blocks, seed=cfg.seed)
            metrics["background_batches"] = record_background(model, new_blocks, cfg.train.batch_size)

            worst = max(metrics["forgetting"].values(), default=0.0)
            guard_failed = cfg.max_forgetting is not None and worst > cfg.max_forgetting
            ref = f"candidate/{c.id}" if guard_failed else "HEAD"
            if should_stop is not None and should_stop():
                raise CycleInterrupted(f"cycle {c.id} stopped before its commit; no version was committed")
            # Expert parallel: every rank writes its columns of the shards to commit; rank 0 gets their hashes.
            slices = dist.write_slices(store, model, origin) if dist is not None and dist.expert_parallel else None

            def commit(to: str) -> VersionInfo:  # the version, the stream's new cursor and the ref move in one transaction
                return commit_model(
                    store, model, origin=origin, parent=parent.id, ref=to, metrics=metrics,
                    cursors={**parent.cursors, stream: data.new_cursor}, optimizer=trained.optimizer_state,
                    message=f"cycle {c.id}: {stream} ({cfg.policy}, +{growth.info['grown_rows']} rows/layer)",
                    created_by=f"cycle:{c.id}", run_config={"cycle": config_to_dict(dataclasses.replace(cfg, train=trained.config))},
                    slices=slices,
                ).version

            def commit_or_keep() -> _Committed:  # rank 0 alone writes the store
                if lease.lost is not None:  # another process may run a cycle now: do not commit beside it
                    raise lease.lost
                try:
                    return _Committed(commit(ref), ref)
                except ConflictError:  # HEAD moved meanwhile (a rollback): keep the work beside it, never over it
                    if ref != "HEAD":
                        raise
                    moved = store.head()
                    return _Committed(commit(f"candidate/{c.id}"), f"candidate/{c.id}", True, moved)  # objects written already

            done = _on_main(dist, commit_or_keep)  # commit; every rank ends the same way: the version, or rank 0's error
            version = done.version
            if done.head_moved:
                ref = done.ref
                row.outcome = ("candidate", version.id, {"ref": ref, "reason": f"HEAD moved from {parent.id} to {done.head}"})
                raise _head_moved(store, c.id, parent.id, done.head, version.id, ref, stream)
            row.outcome = ("candidate" if guard_failed else "committed", version.id, {"ref": ref})
            if guard_failed:  # guard: HEAD did not move
                log(f"guard: forgetting {worst:.3f} nats > max_forgetting {cfg.max_forgetting}: version {version.id} kept as "
                    f"'{ref}', HEAD stays at {parent.id} (automatic rollback)")
            matrix.versions[-1] = version.id
            _log_cycle(c, model, metrics, matrix, usage_counts, usage_blocks)
        if dist is None or dist.is_main:
            _bookkeeping(log, f"clearing the staged data of stream '{stream}'", lambda: registry.clear_staged(stream))
    return CycleResult(c.id, stream, cfg.policy, version.id, parent.id, ref, metrics, time.perf_counter() - t_start)


class _Committed(NamedTuple):
    """What rank 0's commit did, handed to every rank: the version and its ref, and whether
    HEAD had moved (to ``head``) so that the version was kept as a candidate instead."""

    version: VersionInfo
    ref: str
    head_moved: bool = False
    head: int | None = None


def _head_moved(store: ExpertStore, cycle_id: int, parent: int, head: int | None, version: int, ref: str, stream: str) -> HeadMovedError:
    return HeadMovedError(
        f"HEAD moved from version {parent} to {head} while cycle {cycle_id} ran (a rollback?): its version {version} is kept "
        f"as '{ref}', HEAD stays at {head} and stream '{stream}' stays pending; adopt it with "
        f"`lifelong --store {store.path} rollback {ref}`",
        cycle_id=cycle_id, version=version, ref=ref, head=head,
    )


def _on_main(dist: Dist | None, fn: Callable[[], _T]) -> _T:
    """``fn()`` here, or (several processes) on rank 0 with its result on every rank."""
    return fn() if dist is None else dist.on_main(fn)


class _NoLease:
    lost = None


@contextmanager
def _lease(store: ExpertStore, holder: str, wait_s: float, dist: Dist | None,
           log: Callable[[str], None] = print) -> Iterator[Lease | _NoLease]:
    """The cycle lease, kept alive while inside; with several processes rank 0 holds it
    (and releases it on any exit), the others wait for rank 0 to have it. A release that
    fails (disk full) is a warning: the lease of a dead holder is released by the next cycle."""
    if dist is not None and not dist.is_main:
        dist.on_main(lambda: None)
        yield _NoLease()
        return
    lease = Lease(store.engine, "cycle", holder=holder, wait_s=wait_s)
    _on_main(dist, lease.acquire)
    try:
        with lease.keep_alive():
            yield lease
    finally:
        _bookkeeping(log, "releasing the cycle lease", lease.release)


def _bookkeeping(log: Callable[[str], None], what: str, step: Callable[[], object]) -> None:
    """A record-keeping step at the end of a cycle (its row's outcome, staged data, the lease):
    when it fails (disk full, an I/O error) the cycle's own outcome stands — a committed
    version stays committed, an error stays the error reported — and this is a warning."""
    try:
        step()
    except (SQLAlchemyError, OSError, StreamError) as exc:
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        log(f"warning: {what} failed ({detail}); the cycle's outcome stands")


def _prepare(store: ExpertStore, registry: StreamRegistry, stream: str, cfg: CycleConfig,
             log: Callable[[str], None]) -> tuple[VersionInfo, Any, CycleConfig]:
    """The parent (HEAD), the data after its cursor, and the policy this cycle can run."""
    parent = store.version(_head(store))
    # ingest: the data after the parent's committed cursor
    data = registry.ingest(stream, parent.cursors.get(stream), cfg.token_budget)
    if data.train_docs == 0:
        raise NothingPendingError(f"stream '{stream}' has nothing pending after version {parent.id} (held-out documents "
                                  "are never trained on); no version was made")
    heldout_warning = registry.heldout_warning(stream)
    if heldout_warning:
        log(f"warning: {heldout_warning}")
    if cfg.policy != "full" and not any(v.metrics.get("stream") for v in store.log(parent.id)):
        log(f"version {parent.id} has never been trained: this cycle trains it in full (policy full: no growth, "
            f"nothing frozen) instead of {cfg.policy}, which would freeze untrained experts for good")
        cfg = dataclasses.replace(cfg, policy="full")
    return parent, data, cfg


def _eval_loss(c: _Cycle, model: PEERLM, blocks: np.ndarray) -> float:
    """Held-out loss; split across ranks when there are several."""
    return evaluate_loss(model, blocks) if c.dist is None else c.dist.evaluate_loss(model, blocks)


def _head(store: ExpertStore) -> int:
    head = store.head()
    if head is None:
        raise LifelongError(f"the store at {store.path} has no HEAD version")
    return head


@dataclass
class _Row:
    id: int
    outcome: tuple[str, int, dict[str, Any]] | None = None  # (status, version, detail) once committed


@contextmanager
def _cycle_row(store: ExpertStore, stream: str, cfg: CycleConfig, parent: int, holder: str,
               dist: Dist | None = None, log: Callable[[str], None] = print) -> Iterator[_Row]:
    """The cycle's row in ``lifelong_cycles``: 'running' inside, its outcome on exit
    (written by rank 0 alone when there are several processes)."""
    row = _Row(_on_main(dist, lambda: start_cycle(store.engine, stream=stream, policy=cfg.policy, parent=parent, holder=holder,
                                                   outcome=committed_outcome(store))))
    if dist is not None and not dist.is_main:
        yield row
        return
    try:
        yield row
    except HeadMovedError:  # its version was kept as a candidate
        assert row.outcome is not None
        status, version, detail = row.outcome
        _bookkeeping(log, f"recording cycle {row.id}'s outcome", lambda: finish_cycle(
            store.engine, row.id, status, version=version, detail=detail))
        raise
    except BaseException as exc:
        status = "interrupted" if isinstance(exc, (CycleInterrupted, KeyboardInterrupt)) else "failed"
        _bookkeeping(log, f"recording cycle {row.id}'s outcome", lambda: finish_cycle(
            store.engine, row.id, status, detail={"error": str(exc)[:2000]}))
        raise
    assert row.outcome is not None
    status, version, detail = row.outcome  # a row left 'running' is closed by the next cycle (start_cycle)
    _bookkeeping(log, f"recording cycle {row.id}'s outcome", lambda: finish_cycle(
        store.engine, row.id, status, version=version, detail=detail))


def _replay_blocks(c: _Cycle, new_tokens: int, block_size: int, pad_id: int) -> np.ndarray | None:
    """Blocks of earlier streams' committed training data, about ``replay_ratio`` x the new tokens."""
    old_streams = [s for s in c.parent.cursors if s != c.stream]
    if c.cfg.replay_ratio <= 0 or not old_streams:
        return None
    per_stream = max(1, int(c.cfg.replay_ratio * new_tokens / len(old_streams)))
    consumed: dict[str, int] = {}  # training tokens committed per stream along the parent's history
    for v in c.store.log(c.parent.id):
        if v.metrics.get("stream"):
            consumed[v.metrics["stream"]] = consumed.get(v.metrics["stream"], 0) + int(v.metrics.get("new_tokens", 0))
    # Streams are read in a deterministic order, so the first `consumed` tokens from the start
    # are exactly data already trained on: replay never touches uncommitted data.
    parts = [
        c.registry.ingest(s, None, min(per_stream, consumed[s]), use_staged=False).train_tokens
        for s in old_streams
        if consumed.get(s, 0) > 0
    ]
    return pack_blocks(np.concatenate(parts), block_size, pad_id=pad_id, seed=c.cfg.seed).astype(np.int64) if parts else None


def _train(c: _Cycle, model: PEERLM, new_blocks: np.ndarray, new_tokens: int, growth: Growth) -> TrainResult:
    """Train on the new blocks (plus replay and distillation) for ``epochs`` passes."""
    cfg, mc = c.cfg, model.config
    replay = _replay_blocks(c, new_tokens, mc.block_size, mc.pad_id)
    teacher = None
    if replay is not None and cfg.distill_weight > 0:
        teacher, _ = checkout_model(c.store, c.parent.id, device=c.device)
        teacher.eval()
    n_new = cfg.train.batch_size - replay_rows(cfg.train.batch_size, cfg.replay_ratio, replay)
    steps = max(1, math.ceil(cfg.epochs * len(new_blocks) / n_new))
    tcfg = dataclasses.replace(cfg.train, steps=steps, warmup_steps=min(cfg.train.warmup_steps, max(1, steps // 10)))
    return train(
        model, mixed_batches(new_blocks, replay, tcfg.batch_size, cfg.replay_ratio, cfg.seed), tcfg,
        on_step=c.monitor.train_step if c.monitor is not None else None, step_offset=int(c.parent.metrics.get("global_step", 0)),
        progress=c.progress, should_stop=c.should_stop, teacher=teacher, distill_weight=cfg.distill_weight,
        distill_temperature=cfg.distill_temperature,
        optimizer_state=c.store.load_optimizer(c.parent.id, c.device) if c.parent.optimizer_hash else None,
        after_step=growth.after_step, select_rows=growth.sparse, dist=c.dist,
    )


def _evaluate(c: _Cycle, model: PEERLM, held_new: np.ndarray, loss_before: float | None,
              usage_blocks: np.ndarray) -> tuple[dict[str, Any], LossMatrix, dict[str, torch.Tensor]]:
    """One row of the loss matrix (every stream seen so far), forgetting and transfer (the
    parent's ``loss_before`` on the new stream counts for forward transfer), and expert usage
    on ``usage_blocks``; with the matrix (its new row labelled -1) and the per-expert usage."""
    mc = model.config
    chain = list(reversed(c.store.log(c.parent.id)))
    losses: dict[str, float | None] = {}
    retention: dict[str, float | None] = {}
    for s in stream_order(chain, c.parent.cursors, c.stream):
        blocks = held_new if s == c.stream else heldout_blocks(c.registry, s, mc.block_size, mc.pad_id, c.cfg.eval_tokens)
        if not len(blocks):
            losses[s] = None
            continue
        with recording(model.peer_layers(), usage=True) as recs:
            losses[s] = _eval_loss(c, model, blocks)
        if c.dist is not None:
            c.dist.sum_recordings(recs)
        then = experts_when_trained(chain, s) if s != c.stream else None
        if then is not None and recs:
            retention[s] = routing_retention({n: r.usage for n, r in recs.items() if r.usage is not None}, then)
    metrics: dict[str, Any] = {
        "stream": c.stream, "policy": c.cfg.policy, "cycle": c.id, "losses": losses, "loss_before": loss_before,
        "baseline_loss": math.log(mc.vocab_size),
        "routing_retention": retention,  # per earlier stream: router weight still on the experts it was trained with
    }
    matrix = loss_matrix(chain + [SimpleNamespace(id=-1, metrics=metrics)])
    metrics.update(continual_metrics(matrix))
    counts: dict[str, torch.Tensor] = {}
    metrics["usage"] = (expert_usage(model, usage_blocks, counts=counts) if c.dist is None
                        else c.dist.expert_usage(model, usage_blocks, counts=counts))
    return metrics, matrix, counts


def _log_cycle(c: _Cycle, model: PEERLM, metrics: dict[str, Any], matrix: LossMatrix, counts: dict[str, torch.Tensor],
               blocks: np.ndarray) -> None:
    """TensorBoard figures (the loss matrix as an image too) and a sample. The version is
    committed: a failure here must not fail the cycle."""
    if c.monitor is None:
        return
    try:
        sliced = c.dist is not None and c.dist.expert_parallel  # sampling would need every rank: none
        sample = None if sliced else sample_text(model, blocks[0, :16].tolist(), 96, seed=c.cfg.seed)
        c.monitor.cycle(c.id, metrics, model, usage_counts=counts, sample=sample, matrix=matrix)
    except Exception as exc:  # noqa: BLE001
        c.log(f"warning: TensorBoard logging of cycle {c.id} failed: {exc}")
