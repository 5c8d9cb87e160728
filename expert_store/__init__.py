"""Versioned storage of expert shards: content-addressed safetensors objects + a database.

Knows tensors and metadata only — never a model class. See ``docs/store.md``.

Typical use::

    store = ExpertStore.init("run/store", config={"d_model": 256})
    v1 = store.commit(shards=[NewShard("blocks.0.peer", 0, 64, 64 * 128, tensors)],
                      dense=dense, message="first", parent=None)
    v2 = store.commit(shards=[DeltaShard(v1.shards[0].id, {"u": (ids, rows)})],
                      dense=dense, message="sparse update", parent=v1.id)
    store.rollback("HEAD~1")
"""

from __future__ import annotations

from .delta import MAX_DELTA_CHAIN
from .diff import LayerDiff, VersionDiff
from .errors import (
    BudgetExceededError,
    ConflictError,
    CorruptObjectError,
    DatabaseUnreachableError,
    InvalidCommitError,
    MissingObjectError,
    NotAStoreError,
    OversizedValueError,
    ReadOnlyStoreError,
    RefError,
    SchemaVersionError,
    StoreError,
    StoreExistsError,
    StoreNotSharedError,
    StoreWriteError,
    UnknownShardError,
    UnknownVersionError,
)
from .objects import atomic_write
from .records import (
    DeltaShard,
    ExistingShard,
    GcResult,
    NewShard,
    PartInfo,
    Problem,
    RefInfo,
    ReflogEntry,
    ShardInfo,
    SlicedShard,
    VersionInfo,
)
from .residency import Checkout, Residency
from .schema import SCHEMA_VERSION, write_begin
from .slices import Columns
from .sharing import check_share_marker, write_share_marker
from .store import ExpertStore

__all__ = [
    "ExpertStore",
    "NewShard",
    "ExistingShard",
    "DeltaShard",
    "SlicedShard",
    "PartInfo",
    "Columns",
    "MAX_DELTA_CHAIN",
    "ShardInfo",
    "VersionInfo",
    "RefInfo",
    "ReflogEntry",
    "Problem",
    "GcResult",
    "VersionDiff",
    "LayerDiff",
    "Residency",
    "Checkout",
    "atomic_write",
    "SCHEMA_VERSION",
    "write_begin",
    "StoreError",
    "NotAStoreError",
    "StoreExistsError",
    "SchemaVersionError",
    "ReadOnlyStoreError",
    "UnknownVersionError",
    "UnknownShardError",
    "InvalidCommitError",
    "ConflictError",
    "RefError",
    "CorruptObjectError",
    "MissingObjectError",
    "BudgetExceededError",
    "DatabaseUnreachableError",
    "StoreNotSharedError",
    "StoreWriteError",
    "OversizedValueError",
    "check_share_marker",
    "write_share_marker",
]
