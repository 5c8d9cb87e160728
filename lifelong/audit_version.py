"""Audit a stored version: check it out, feed held-out text, compare routers, record the result.

The FAISS comparison itself lives in :mod:`lifelong.audit_exact`; this module wires it to the
store (version addressing, an ``lifelong_audits`` row per audit), the streams (held-out text)
and TensorBoard.
"""

from __future__ import annotations

from typing import Any

import torch

from expert_store import ExpertStore
from streams import StreamRegistry

from .audit_exact import audit_model
from .audit_report import AuditError, AuditReport
from .checkpoint import checkout_model
from .evaluate import heldout_blocks
from .monitor import Monitor
from .records import record_audit

__all__ = ["audit_version"]


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
    dist: Any = None,
) -> AuditReport:
    """Audit version ``spec`` on held-out text of ``streams`` (default: every stream it was trained on).

    With ``dist`` (a :class:`lifelong.distributed.Dist`): every rank takes the same held-out
    queries and audits its share of them (:func:`lifelong.audit_exact.audit_layer`); the counts
    are summed, and rank 0 alone records the audit and writes to ``monitor``."""
    if store.head() is None:
        raise AuditError(f"the store at {store.path} has no versions to audit")
    info = store.version(spec)
    names = streams or list(info.cursors) or [s.name for s in registry.list()]
    if not names:
        raise AuditError("no streams to take held-out text from: add one with `lifelong stream add`")
    for name in names:
        registry.get(name)  # unknown stream: clear error
    model, _ = checkout_model(store, info.id, device=dist.device if dist is not None else device)
    mc = model.config
    blocks = heldout_blocks(registry, names, mc.block_size, mc.pad_id, max(mc.block_size + 1, 4 * max_queries // len(names)))
    if len(blocks) == 0:
        raise AuditError(
            f"no held-out text for stream(s) {', '.join(names)}: ingest or train on them first "
            "(held-out documents are set aside as a stream is read)"
        )
    report = audit_model(
        model, blocks, max_queries=max_queries, chunk_rows=chunk_rows, progress=progress,
        extra={"version": info.id, "streams": names}, dist=dist,
    )
    if dist is not None and not dist.is_main:
        return report
    if record:
        record_audit(store.engine, info.id, int(report.total.queries), float(report.min_recall), report.to_dict())
    if monitor is not None:
        monitor.audit(info.id, report)
    return report
