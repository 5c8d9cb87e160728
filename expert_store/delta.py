"""Delta shards: the changed rows of a shard, stored as an object on top of a base shard.

A sparse update changes a few rows of many shards. Rather than rewriting a whole shard, a
commit can store a :class:`~expert_store.records.DeltaShard`: a delta object holding, for
each changed tensor ``name`` of the base, ``name.ids`` (R,) int64 distinct row indices
along dim 0 and ``name.rows`` (R, ...) their new values. The delta is a safetensors object
like any other (content-addressed, written atomically, re-hashed on load and ``verify``);
the shard row records its base shard (``base_id``) and how many deltas lie between it and
its full base (``depth``).

Loading a delta shard loads its chain root first (the full object), then applies each
delta in order with ``index_copy_``: the result is bit-identical to the full tensors. A
commit whose chain would exceed :data:`MAX_DELTA_CHAIN` deltas writes the materialised
full tensors instead (compaction), so a checkout never reads more than that many deltas.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from sqlalchemy import select
from sqlalchemy.orm import Session

from . import slices
from .errors import CorruptObjectError, InvalidCommitError, UnknownShardError
from .objects import ObjectInfo, TensorSpec
from .records import DeltaShard, ShardInfo, shard_info
from .schema import Shard, VersionShard

if TYPE_CHECKING:
    from .store import ExpertStore

__all__ = [
    "MAX_DELTA_CHAIN",
    "Rows",
    "encode",
    "decode",
    "problems",
    "apply",
    "chain",
    "affected",
    "check_base",
    "write",
    "load",
]

#: At most this many deltas between a shard and its full base; a longer chain is compacted.
MAX_DELTA_CHAIN = 8

IDS, ROWS = "ids", "rows"

#: Tensor name -> (ids (R,) int64, replacement rows (R, ...)).
Rows = dict[str, tuple[torch.Tensor, torch.Tensor]]
Tensors = dict[str, torch.Tensor]


def encode(rows: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The tensors of a delta object: ``name.ids`` and ``name.rows`` per changed tensor."""
    out: dict[str, torch.Tensor] = {}
    for name, (ids, values) in rows.items():
        out[f"{name}.{IDS}"] = ids.detach()
        out[f"{name}.{ROWS}"] = values.detach()
    return out


def decode(tensors: Mapping[str, torch.Tensor]) -> Rows:
    """Inverse of :func:`encode`; ``ValueError`` when the names do not pair up."""
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name, dot, kind = key.rpartition(".")
        if not dot or kind not in (IDS, ROWS):
            raise ValueError(f"tensor {key!r} is neither NAME.{IDS} nor NAME.{ROWS}")
        halves.setdefault(name, {})[kind] = tensor
    unpaired = sorted(name for name, half in halves.items() if len(half) != 2)
    if unpaired:
        raise ValueError(f"tensor(s) {', '.join(map(repr, unpaired))} lack their {IDS} or {ROWS} half")
    return {name: (half[IDS], half[ROWS]) for name, half in sorted(halves.items())}


def problems(base: Mapping[str, TensorSpec], rows: Mapping[str, tuple[torch.Tensor, TensorSpec]]) -> list[str]:
    """What keeps a delta from applying to a base of tensors ``base`` (name -> dtype, shape).

    ``rows`` maps a tensor name to (its ids, the dtype and shape of its replacement rows);
    the ids are read, the rows need not be. Empty when the delta applies.
    """
    out: list[str] = []
    for name, (ids, (dtype, shape)) in rows.items():
        if name not in base:
            out.append(f"tensor {name!r} is not in the base shard (it has {', '.join(map(repr, sorted(base)))})")
            continue
        base_dtype, base_shape = base[name]
        if not base_shape:
            out.append(f"tensor {name!r} is a scalar in the base shard; it has no rows to replace")
            continue
        if ids.dtype != torch.int64 or ids.dim() != 1:
            out.append(f"ids of tensor {name!r} must be a 1-D int64 tensor, got {ids.dtype} of shape {tuple(ids.shape)}")
            continue
        want = (ids.numel(), *base_shape[1:])
        if dtype != base_dtype or tuple(shape) != want:
            out.append(
                f"rows of tensor {name!r} must be {str(base_dtype).removeprefix('torch.')} of shape {want} "
                f"(the base is {tuple(base_shape)}), got {str(dtype).removeprefix('torch.')} of shape {tuple(shape)}"
            )
        if ids.numel() == 0:
            continue
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= base_shape[0]:
            out.append(f"ids of tensor {name!r} must lie in [0, {base_shape[0]}), got {low}..{high}")
        unique, counts = torch.unique(ids, return_counts=True)
        if unique.numel() != ids.numel():
            dup = unique[counts > 1][:5].tolist()
            out.append(f"ids of tensor {name!r} repeat (e.g. {', '.join(map(str, dup))}); each row may change once")
    return out


def specs(tensors: Mapping[str, torch.Tensor]) -> dict[str, TensorSpec]:
    """Name -> (dtype, shape) of in-memory tensors."""
    return {name: (t.dtype, tuple(t.shape)) for name, t in tensors.items()}


def row_specs(rows: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, tuple[torch.Tensor, TensorSpec]]:
    """The argument :func:`problems` takes, from (ids, rows) pairs in memory."""
    return {name: (ids, (values.dtype, tuple(values.shape))) for name, (ids, values) in rows.items()}


def apply(tensors: dict[str, torch.Tensor], rows: Rows) -> None:
    """Write the delta's rows into ``tensors`` in place (checked with :func:`problems` first)."""
    for name, (ids, values) in rows.items():
        target = tensors[name]
        target.index_copy_(0, ids.detach().to(target.device), values.detach().to(target.device))


def chain(session: Session, shard_id: int) -> list[ShardInfo]:
    """The shard and its bases, full base first, the shard itself last."""
    out: list[ShardInfo] = []
    seen: set[int] = set()
    next_id: int | None = shard_id
    while next_id is not None:
        if next_id in seen:
            raise UnknownShardError(f"the base chain of shard {shard_id} loops through shard {next_id}")
        seen.add(next_id)
        row = session.get(Shard, next_id)
        if row is None:
            what = f"shard {next_id} does not exist" if next_id == shard_id else (
                f"shard {out[-1].id} (in the chain of shard {shard_id}) has a missing base shard {next_id}")
            raise UnknownShardError(what)
        out.append(shard_info(row))
        next_id = row.base_id
    return out[::-1]


def affected(session: Session, shard_id: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(shard ids, version ids) that need shard ``shard_id``: it, the deltas on it (at any
    depth), and the versions using any of them."""
    shards = {shard_id}
    frontier = {shard_id}
    while frontier:
        frontier = set(session.scalars(select(Shard.id).where(Shard.base_id.in_(frontier)))) - shards
        shards |= frontier
    versions = set(session.scalars(select(VersionShard.version_id).where(VersionShard.shard_id.in_(shards))))
    return tuple(sorted(shards)), tuple(sorted(versions))


# ------------------------------------------------------------------ commit and load


def check_base(store: ExpertStore, shard: DeltaShard) -> ShardInfo:
    """The stored base of a delta, once the delta is known to fit it; else
    :class:`InvalidCommitError` naming shard and tensor (nothing is written before this)."""
    members = store.shard_chain(shard.base_shard_id)
    base = members[-1]
    try:
        spec = slices.header(store.objects, members[0])  # deltas never change shapes; the root may be sliced
    except CorruptObjectError as exc:
        raise shard_error(store, base, members[0], exc) from exc
    found = problems(spec, row_specs(shard.rows))
    if found:
        raise InvalidCommitError(
            f"delta on shard {base.id} (layer {base.layer!r}, rows {base.row_start}..{base.row_end}): "
            + "; ".join(found) + "; nothing was written"
        )
    return base


def write(store: ExpertStore, shard: DeltaShard, base: ShardInfo) -> tuple[ObjectInfo, bool]:
    """Write the delta object; past :data:`MAX_DELTA_CHAIN` write the full tensors instead.

    Returns (the object, whether it holds the full tensors).
    """
    if base.depth < MAX_DELTA_CHAIN:
        return store.objects.put(encode(shard.rows)), False
    tensors = store.load_shard(base)
    apply(tensors, shard.rows)
    return store.objects.put(tensors), True


def load(store: ExpertStore, info: ShardInfo, device: str | torch.device, verify: bool,
         resident: Mapping[int, Tensors] | None) -> Tensors:
    """See :meth:`ExpertStore.load_shard`."""
    members = [info] if info.base_id is None else store.shard_chain(info)
    tensors: Tensors | None = None
    start = 1
    for i in range(len(members) - 1, -1, -1) if resident else ():
        if members[i].id in resident:
            tensors = {k: t.detach().to(device, copy=True) for k, t in resident[members[i].id].items()}
            start = i + 1
            break
    if tensors is None:
        tensors = _load_object(store, info, members[0], device, verify)
    for member in members[start:]:
        raw = _load_object(store, info, member, device, verify)
        try:
            rows = decode(raw)
            found = problems(specs(tensors), row_specs(rows))
            if found:
                raise ValueError("; ".join(found))
        except ValueError as exc:
            bad = CorruptObjectError(f"delta object {member.object_hash} does not apply: {exc}", hash=member.object_hash)
            raise shard_error(store, info, member, bad) from exc
        apply(tensors, rows)
    return tensors


def _load_object(store: ExpertStore, info: ShardInfo, member: ShardInfo, device: str | torch.device,
                 verify: bool) -> Tensors:
    try:
        if member.parts:  # a sliced shard (the root of a chain): its parts assembled
            return slices.load(store.objects, member, device, verify)
        return store.objects.load(member.object_hash, device, verify)
    except CorruptObjectError as exc:
        raise shard_error(store, info, member, exc) from exc


def shard_error(store: ExpertStore, info: ShardInfo, member: ShardInfo, exc: CorruptObjectError) -> CorruptObjectError:
    """``exc`` (about the object of ``member``, met while loading ``info``) naming the shards
    and the versions that need that object."""
    with Session(store.engine) as session:
        _, versions = affected(session, member.id)
    where = f"shard {info.id} (layer {info.layer!r}, rows {info.row_start}..{info.row_end})"
    if member.id != info.id:
        where += f", through shard {member.id} of its delta chain,"
    return type(exc)(
        f"{where} needed by version(s) {', '.join(map(str, versions)) or 'none'}: {exc}",
        hash=exc.hash or member.object_hash, shard_id=info.id, version_ids=versions,
    )
