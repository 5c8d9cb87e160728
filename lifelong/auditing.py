"""Audit a stored version: check it out, feed held-out text, compare routers, record the result.

The FAISS comparison itself lives in :mod:`lifelong.audit`; this module wires it to the
store (version addressing, an ``lifelong_audits`` row per audit), the streams (held-out text)
and TensorBoard.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from expert_store import ExpertStore
from streams import StreamRegistry, pack_blocks

from .audit import AuditError, AuditReport, audit_model
from .checkpoint import best_device, checkout_model
from .monitor import Monitor
from .records import AuditRow, create_tables, utcnow

__all__ = ["audit_version", "DEFAULT_MIN_RECALL"]

DEFAULT_MIN_RECALL = 1.0 - 1e-6  # recall up to float ties must be exact


def heldout_blocks(registry: StreamRegistry, streams: list[str], block_len: int, max_tokens: int) -> np.ndarray:
    parts = []
    for name in streams:
        tokens = registry.heldout(name, max_tokens=max_tokens).tokens
        if tokens.size > block_len:
            parts.append(pack_blocks(tokens, block_len, drop_last=True).astype(np.int64))
    if not parts:
        raise AuditError(
            f"no held-out text for stream(s) {', '.join(streams)}: ingest or train on them first "
            "(held-out documents are set aside as a stream is read)"
        )
    return np.concatenate(parts)


def audit_version(
    store: ExpertStore,
    registry: StreamRegistry,
    spec: int | str = "HEAD",
    *,
    streams: list[str] | None = None,
    max_queries: int = 2048,
    device: str | torch.device | None = None,
    chunk_rows: int | None = None,
    progress: bool = True,
    monitor: Monitor | None = None,
    record: bool = True,
) -> AuditReport:
    """Audit version ``spec`` on held-out text of ``streams`` (default: every stream it was trained on)."""
    if store.head() is None:
        raise AuditError(f"the store at {store.path} has no versions to audit")
    info = store.version(spec)
    names = streams or list(info.cursors) or [s.name for s in registry.list()]
    if not names:
        raise AuditError("no streams to take held-out text from: add one with `lifelong stream add`")
    for name in names:
        registry.get(name)  # unknown stream: clear error
    model, _ = checkout_model(store, info.id, device=device or best_device())
    per_stream = max(model.config.block_size + 1, 4 * max_queries // len(names))
    blocks = heldout_blocks(registry, names, model.config.block_size, per_stream)
    report = audit_model(
        model, blocks, max_queries=max_queries, chunk_rows=chunk_rows, progress=progress,
        extra={"version": info.id, "streams": names},
    )
    if record:
        create_tables(store.engine)
        data: dict[str, Any] = report.to_dict()
        with store.engine.begin() as conn:
            conn.execute(
                AuditRow.__table__.insert().values(
                    version=info.id, created_at=utcnow(), queries=int(report.total.queries),
                    recall=float(report.min_recall), report=data,
                )
            )
    if monitor is not None:
        monitor.audit(info.id, report)
    return report
