"""Plain dataclasses that cross the store's API: what goes into a commit, what comes out.

Nothing here touches the database or the disk; :func:`shard_info` and
:func:`version_info` convert ORM rows into these records.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from .schema import Reflog, Ref, Shard, Version

__all__ = [
    "NewShard",
    "ExistingShard",
    "DeltaShard",
    "SlicedShard",
    "PartInfo",
    "ShardInfo",
    "VersionInfo",
    "RefInfo",
    "ReflogEntry",
    "Problem",
    "GcResult",
    "shard_info",
    "version_info",
    "ref_info",
    "reflog_entry",
]


@dataclass
class NewShard:
    """A shard to be written by a commit: rows ``[row_start, row_end)`` of ``layer``."""

    layer: str
    row_start: int
    row_end: int
    n_experts: int
    tensors: dict[str, torch.Tensor]
    frozen: bool = False


@dataclass(frozen=True)
class ExistingShard:
    """Reuse an already stored shard row as is: nothing is rewritten or re-hashed."""

    shard_id: int


@dataclass
class DeltaShard:
    """Some rows of a stored shard replaced: stored as a delta object on that base shard.

    ``rows`` maps a tensor name of the base to ``(ids, values)``: ``ids`` a (R,) int64
    tensor of distinct indices along dim 0, ``values`` (R, ...) the replacement rows (same
    dtype and trailing shape as the base tensor). Tensors not named are unchanged. The new
    shard has the base's layer, row range, n_experts and dtype.
    """

    base_shard_id: int
    rows: dict[str, tuple[torch.Tensor, torch.Tensor]]
    frozen: bool = False


@dataclass(frozen=True)
class PartInfo:
    """A column slice of a sliced shard, written as its own object (:meth:`ExpertStore.write_part`):
    columns ``[col_start, col_end)`` (along dim 1) of each of the shard's split tensors."""

    col_start: int
    col_end: int
    object_hash: str
    object_bytes: int  # tensor payload bytes of the part's object


@dataclass
class SlicedShard:
    """A new shard whose tensors were written in column slices, e.g. by the processes of an
    expert-parallel run, each its own columns: nothing ever holds the whole shard.

    ``parts`` (already written with :meth:`ExpertStore.write_part`) tile the columns of the
    split tensors from 0, in order; ``tensors`` (e.g. row keys) are stored whole, as the
    shard's own object. Loaded, the shard has both, the split tensors assembled (see
    :mod:`expert_store.slices`).
    """

    layer: str
    row_start: int
    row_end: int
    n_experts: int
    tensors: dict[str, torch.Tensor]
    parts: list[PartInfo]
    frozen: bool = False


@dataclass(frozen=True)
class ShardInfo:
    """A stored shard (one row of ``shards``)."""

    id: int
    object_hash: str
    layer: str
    row_start: int
    row_end: int
    n_experts: int
    dtype: str
    bytes: int  # tensor payload bytes: what the shard occupies once loaded (chain applied)
    frozen: bool
    created_by: str | None
    created_at: datetime
    base_id: int | None = None  # the shard this one is a delta on; None for a full shard
    depth: int = 0  # deltas between this shard and its full base (0 for a full shard)
    object_bytes: int = 0  # tensor payload bytes of this shard's own objects (the delta's; a sliced shard's with its parts)
    parts: tuple[PartInfo, ...] = ()  # a sliced shard's column slices; empty for any other

    @property
    def rows(self) -> int:
        return self.row_end - self.row_start

    @property
    def is_delta(self) -> bool:
        return self.base_id is not None

    @property
    def is_sliced(self) -> bool:
        return bool(self.parts)


@dataclass(frozen=True)
class VersionInfo:
    """An immutable version: ordered shards, dense (and optimizer) objects, JSON facts."""

    id: int
    parent: int | None
    message: str
    created_at: datetime
    metrics: dict[str, Any]
    config: dict[str, Any]
    cursors: dict[str, Any]
    dense_hash: str
    optimizer_hash: str | None
    shards: list[ShardInfo] = field(default_factory=list)

    def layers(self) -> dict[str, list[ShardInfo]]:
        """Shards grouped by layer, in version order."""
        grouped: dict[str, list[ShardInfo]] = {}
        for shard in self.shards:
            grouped.setdefault(shard.layer, []).append(shard)
        return grouped

    @property
    def shard_bytes(self) -> int:
        """Bytes of the shards' tensors once loaded (what a residency budget counts)."""
        return sum(shard.bytes for shard in self.shards)

    @property
    def object_bytes(self) -> int:
        """Bytes the shards' own objects store (a delta shard counts its delta only)."""
        return sum(shard.object_bytes for shard in self.shards)

    @property
    def n_experts(self) -> int:
        return sum(shard.n_experts for shard in self.shards)


@dataclass(frozen=True)
class RefInfo:
    name: str
    version_id: int
    kind: str  # "ref" (movable) or "tag" (fixed)


@dataclass(frozen=True)
class ReflogEntry:
    id: int
    ref: str
    old: int | None
    new: int
    when: datetime
    who: str
    why: str


@dataclass(frozen=True)
class Problem:
    """One finding of :meth:`ExpertStore.verify`."""

    kind: str  # "missing-object" | "corrupt-object" | "bad-row" | "bad-delta" | "bad-slices"
    detail: str
    hash: str | None = None
    shard_ids: tuple[int, ...] = ()
    version_ids: tuple[int, ...] = ()

    def __str__(self) -> str:
        return f"{self.kind}: {self.detail}"


@dataclass(frozen=True)
class GcResult:
    """What :meth:`ExpertStore.gc` removed (or would remove, on a dry run)."""

    objects: list[str]
    temp_files: list[Path]
    bytes: int
    dry_run: bool


def _utc(value: datetime) -> datetime:
    """In UTC: SQLite returns them naive (they were written in UTC), PostgreSQL in the
    session's time zone."""
    return value.astimezone(timezone.utc) if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)


def shard_info(row: Shard) -> ShardInfo:
    return ShardInfo(
        id=row.id,
        object_hash=row.object_hash,
        layer=row.layer,
        row_start=row.row_start,
        row_end=row.row_end,
        n_experts=row.n_experts,
        dtype=row.dtype,
        bytes=row.bytes,
        frozen=row.frozen,
        created_by=row.created_by,
        created_at=_utc(row.created_at),
        base_id=row.base_id,
        depth=row.depth or 0,
        object_bytes=row.bytes if row.object_bytes is None else row.object_bytes,
        parts=tuple(PartInfo(p.col_start, p.col_end, p.object_hash, p.object_bytes) for p in row.parts),
    )


def version_info(row: Version) -> VersionInfo:
    return VersionInfo(
        id=row.id,
        parent=row.parent_id,
        message=row.message,
        created_at=_utc(row.created_at),
        metrics=dict(row.metrics or {}),
        config=dict(row.config or {}),
        cursors=dict(row.cursors or {}),
        dense_hash=row.dense_hash,
        optimizer_hash=row.optimizer_hash,
        shards=[shard_info(link.shard) for link in row.shard_links],
    )


def ref_info(row: Ref) -> RefInfo:
    return RefInfo(name=row.name, version_id=row.version_id, kind=row.kind)


def reflog_entry(row: Reflog) -> ReflogEntry:
    return ReflogEntry(
        id=row.id, ref=row.ref, old=row.old, new=row.new, when=_utc(row.when), who=row.who, why=row.why
    )
