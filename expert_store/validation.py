"""Checks of commit arguments, done before anything is written."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import torch

from .errors import InvalidCommitError, OversizedValueError
from .records import DeltaShard, ExistingShard, NewShard, SlicedShard
from .schema import MAX_JSON_BYTES, Shard

__all__ = ["check_json", "check_new_shard", "check_delta_shard", "check_tensors", "check_overlaps", "dtype_name"]


def check_json(name: str, value: Any) -> dict[str, Any]:
    """``value`` (None -> ``{}``) if it is a JSON-serialisable dict of at most
    :data:`~expert_store.schema.MAX_JSON_BYTES` (what the store would refuse to read back)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidCommitError(f"{name} must be a dict, not {type(value).__name__}")
    try:
        text = json.dumps(value)
    except (TypeError, ValueError) as exc:
        raise InvalidCommitError(f"{name} is not JSON-serialisable: {exc}") from exc
    if len(text) > MAX_JSON_BYTES:
        raise OversizedValueError(f"{name} is {len(text) / 2**20:.1f} MiB of JSON, over the "
                                  f"{MAX_JSON_BYTES / 2**20:.0f} MiB the store accepts; nothing was written")
    return value


def dtype_name(tensors: dict[str, torch.Tensor]) -> str:
    """``"float32"``, or the sorted dtypes joined by commas when they differ."""
    return ",".join(sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()}))


def check_new_shard(shard: NewShard) -> None:
    """A new shard needs a layer name, a non-empty row range and tensors."""
    if not shard.layer or not isinstance(shard.layer, str):
        raise InvalidCommitError(f"shard layer must be a non-empty str, got {shard.layer!r}")
    if not 0 <= shard.row_start < shard.row_end:
        raise InvalidCommitError(
            f"shard of {shard.layer!r} has an empty or negative row range "
            f"[{shard.row_start}, {shard.row_end})"
        )
    if shard.n_experts < 0:
        raise InvalidCommitError(f"shard of {shard.layer!r} has n_experts={shard.n_experts}")
    if not shard.tensors:
        raise InvalidCommitError(f"shard of {shard.layer!r} rows {shard.row_start}..{shard.row_end} has no tensors")


def check_delta_shard(shard: DeltaShard) -> None:
    """A delta names its base by id and maps tensor names to (ids, rows) tensor pairs.

    Whether it fits its base (names, dtypes, shapes, ids in range and distinct) is checked
    against the stored base by the commit (:func:`expert_store.delta.problems`).
    """
    if isinstance(shard.base_shard_id, bool) or not isinstance(shard.base_shard_id, int):
        raise InvalidCommitError(f"a DeltaShard's base_shard_id must be an int, got {shard.base_shard_id!r}")
    if not isinstance(shard.rows, dict):
        raise InvalidCommitError(f"delta on shard {shard.base_shard_id}: rows must be a dict, not {type(shard.rows).__name__}")
    for name, pair in shard.rows.items():
        if not isinstance(name, str) or not name:
            raise InvalidCommitError(f"delta on shard {shard.base_shard_id}: tensor names must be non-empty str, got {name!r}")
        if not (isinstance(pair, tuple) and len(pair) == 2 and all(isinstance(t, torch.Tensor) for t in pair)):
            raise InvalidCommitError(
                f"delta on shard {shard.base_shard_id}, tensor {name!r}: expected (ids, rows) tensors, got {type(pair).__name__}"
            )


def check_tensors(shards: Sequence[NewShard | ExistingShard | DeltaShard | SlicedShard], dense: dict[str, torch.Tensor]) -> None:
    """Shards are NewShard/ExistingShard/DeltaShard/SlicedShard, new ones well formed (a
    sliced one is checked with its parts: :func:`expert_store.slices.check`); dense weights present."""
    if not dense:
        raise InvalidCommitError("dense weights are empty; a version needs its dense weights")
    for shard in shards:
        if isinstance(shard, NewShard):
            check_new_shard(shard)
        elif isinstance(shard, DeltaShard):
            check_delta_shard(shard)
        elif not isinstance(shard, (ExistingShard, SlicedShard)):
            raise InvalidCommitError(
                f"shards must be NewShard, ExistingShard or DeltaShard (or SlicedShard), not {type(shard).__name__}"
            )


def check_overlaps(shards: Sequence[Shard]) -> None:
    """Within one version, the row ranges of a layer's shards must be disjoint."""
    by_layer: dict[str, list[Shard]] = {}
    for shard in shards:
        by_layer.setdefault(shard.layer, []).append(shard)
    for layer, rows in by_layer.items():
        rows = sorted(rows, key=lambda s: s.row_start)
        for before, after in zip(rows, rows[1:]):
            if after.row_start < before.row_end:
                raise InvalidCommitError(
                    f"layer {layer!r}: shard rows [{before.row_start}, {before.row_end}) and "
                    f"[{after.row_start}, {after.row_end}) overlap"
                )
