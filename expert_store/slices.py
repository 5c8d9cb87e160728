"""Sliced shards: a shard whose tensors were written in column slices, one object per slice.

The processes of an expert-parallel run each hold columns ``[r*d/P, (r+1)*d/P)`` of every
expert table. To commit without gathering a table anywhere, each writes its columns of a
shard's split tensors (``u``, ``v``) as an object of its own (a *part*,
:meth:`ExpertStore.write_part`, content-addressed and write-once like any object, so the
processes write into the shared directory at once), and one process commits a
:class:`~expert_store.records.SlicedShard` naming the parts. Its shard row's own object holds
the tensors that are not split (the row keys); the ``shard_parts`` rows list the parts in
column order: ``(position, col_start, col_end, object hash, payload bytes)``, tiling the
columns from 0. Nothing about the number of processes is stored beyond that tiling.

Loading a sliced shard reads its own object and the parts, and concatenates each split
tensor along dim 1: the result is bit-identical to the whole tensors, whatever the number of
processes that wrote it or that reads it. A reader that wants only some columns (an
expert-parallel checkout, :class:`Columns`) reads only the parts that overlap them, and from
a shard that is not sliced only those columns (``safetensors`` slices, no whole tensor).

A sliced shard can be the base of delta shards (:mod:`.delta`): its chain's root is then
loaded assembled. ``verify`` re-hashes every part and checks that the parts fit together;
``gc`` keeps every part a shard row references.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from sqlalchemy import select
from sqlalchemy.orm import Session

from .errors import CorruptObjectError, InvalidCommitError
from .objects import ObjectStore, TensorSpec
from .records import PartInfo, ShardInfo, SlicedShard
from .schema import Shard, ShardPart

__all__ = ["Columns", "check_part", "check", "shard_row", "header", "load", "cut", "part_hashes", "problems"]

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Columns:
    """Columns ``[start, end)`` (along dim 1) of the tensors ``names``; other tensors whole."""

    start: int
    end: int
    names: tuple[str, ...]


def _payload(spec: TensorSpec) -> int:
    dtype, shape = spec
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ------------------------------------------------------------------------- commit
def check_part(col_start: int, col_end: int, tensors: Mapping[str, torch.Tensor]) -> None:
    """A part holds columns ``[col_start, col_end)`` of at least one tensor of 2+ dims."""
    if not (isinstance(col_start, int) and isinstance(col_end, int) and 0 <= col_start < col_end):
        raise InvalidCommitError(f"a part's columns must be 0 <= start < end, got [{col_start}, {col_end})")
    if not tensors:
        raise InvalidCommitError(f"the part of columns [{col_start}, {col_end}) has no tensors")
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or t.dim() < 2 or t.shape[1] != col_end - col_start:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise InvalidCommitError(f"tensor {name!r} of the part of columns [{col_start}, {col_end}) must have "
                                     f"{col_end - col_start} columns (dim 1), got {shape}")


def _part_specs(objects: ObjectStore, parts: Sequence[PartInfo], where: str,
                read: Collection[PartInfo] | None = None) -> dict[str, TensorSpec]:
    """The assembled (dtype, shape) of each split tensor, from the headers of the parts (only
    those in ``read`` when given; the tiling is checked on all); ValueError saying what does
    not fit (names, dtypes, rows, widths, tiling), CorruptObjectError for a part whose object
    is missing or unreadable."""
    if not parts:
        raise ValueError(f"{where} has no parts")
    end = 0
    for i, part in enumerate(parts):
        if part.col_start != end or part.col_end <= part.col_start:
            raise ValueError(f"{where}: part {i} holds columns [{part.col_start}, {part.col_end}) where column {end} "
                             "comes next (the parts must tile the columns from 0, in order)")
        end = part.col_end
    first: dict[str, TensorSpec] | None = None
    for i, part in enumerate(parts):
        if read is not None and part not in read:
            continue
        specs = objects.header(part.object_hash)
        if not specs:
            raise ValueError(f"{where}: part {i} (object {part.object_hash[:12]}) holds no tensors")
        first = first if first is not None else specs
        if specs.keys() != first.keys():
            raise ValueError(f"{where}: part {i} holds tensors {sorted(specs)}, part 0 {sorted(first)}")
        for name, (dtype, shape) in specs.items():
            want_dtype, want_shape = first[name]
            if len(shape) < 2 or shape[1] != part.col_end - part.col_start:
                raise ValueError(f"{where}: tensor {name!r} of part {i} has shape {shape}, not "
                                 f"{part.col_end - part.col_start} columns")
            if dtype != want_dtype or shape[:1] + shape[2:] != want_shape[:1] + want_shape[2:]:
                raise ValueError(f"{where}: tensor {name!r} of part {i} is {_dtype(dtype)} {shape}, part 0's "
                                 f"{_dtype(want_dtype)} {want_shape}")
    assert first is not None
    return {name: (dtype, (shape[0], end, *shape[2:])) for name, (dtype, shape) in first.items()}


@dataclass(frozen=True)
class Checked:
    """A :class:`SlicedShard` found sound at commit: its dtype name and payload bytes."""

    dtype: str
    bytes: int
    part_bytes: tuple[int, ...]


def check(objects: ObjectStore, shard: SlicedShard) -> Checked:
    """Check a sliced shard before anything is written: well formed, and its parts written
    and fitting together (headers only; ``verify`` re-hashes them). :class:`InvalidCommitError`."""
    where = f"sliced shard of {shard.layer!r} rows {shard.row_start}..{shard.row_end}"
    if not shard.layer or not isinstance(shard.layer, str):
        raise InvalidCommitError(f"shard layer must be a non-empty str, got {shard.layer!r}")
    if not 0 <= shard.row_start < shard.row_end or shard.n_experts < 0:
        raise InvalidCommitError(f"{where}: invalid row range or n_experts ({shard.n_experts})")
    if not isinstance(shard.parts, (list, tuple)) or not all(isinstance(p, PartInfo) for p in shard.parts):
        raise InvalidCommitError(f"{where}: parts must be a list of PartInfo (from ExpertStore.write_part)")
    try:
        specs = _part_specs(objects, shard.parts, where)
    except (ValueError, CorruptObjectError) as exc:
        raise InvalidCommitError(f"{exc}; nothing was written") from exc
    both = sorted(specs.keys() & shard.tensors.keys())
    if both:
        raise InvalidCommitError(f"{where}: tensor(s) {both} are both whole and in parts; nothing was written")
    whole = {name: (t.dtype, tuple(t.shape)) for name, t in shard.tensors.items()}
    dtype = ",".join(sorted({_dtype(d) for d, _ in [*whole.values(), *specs.values()]}))
    part_bytes = tuple(sum(_payload(s) for s in objects.header(p.object_hash).values()) for p in shard.parts)
    return Checked(dtype, sum(_payload(s) for s in whole.values()) + sum(part_bytes), part_bytes)


def shard_row(shard: SlicedShard, object_hash: str, checked: Checked, created_by: str | None, now: datetime) -> Shard:
    """The row of a sliced shard (its own object: ``object_hash``) with its part rows."""
    row = Shard(layer=shard.layer, row_start=shard.row_start, row_end=shard.row_end, n_experts=shard.n_experts,
                dtype=checked.dtype, bytes=checked.bytes, object_bytes=checked.bytes, frozen=shard.frozen,
                created_by=created_by, created_at=now, object_hash=object_hash, base_id=None, depth=0)
    row.parts = [ShardPart(position=i, col_start=p.col_start, col_end=p.col_end, object_hash=p.object_hash, object_bytes=n)
                 for i, (p, n) in enumerate(zip(shard.parts, checked.part_bytes))]
    return row


# --------------------------------------------------------------------------- load
def _assembled(objects: ObjectStore, info: ShardInfo, read: Collection[PartInfo] | None = None) -> dict[str, TensorSpec]:
    """(dtype, shape) of a sliced shard's split tensors, assembled (from the headers of the
    parts ``read``, default all); CorruptObjectError."""
    try:
        return _part_specs(objects, info.parts, f"sliced shard {info.id}", read)
    except ValueError as exc:
        raise CorruptObjectError(str(exc), hash=info.parts[0].object_hash if info.parts else info.object_hash) from exc


def header(objects: ObjectStore, info: ShardInfo) -> dict[str, TensorSpec]:
    """(dtype, shape) of each tensor of a full or sliced shard (split tensors assembled),
    from headers alone. CorruptObjectError when the parts do not fit together."""
    specs = objects.header(info.object_hash)
    return {**specs, **_assembled(objects, info)} if info.parts else specs


def _read(objects: ObjectStore, hash: str, device: str | torch.device, verify: bool,
          cuts: Mapping[str, tuple[int, int]], names: Collection[str] | None = None) -> Tensors:
    """Tensors ``names`` (all when None) of one object, those in ``cuts`` only columns
    ``[lo, hi)``: sliced from the file, never read whole."""
    if verify:
        objects.check(hash)
    specs = objects.header(hash)
    if not cuts.keys() & specs.keys():
        return objects.load(hash, device, verify=False, names=None if names is None else list(names))
    out: Tensors = {}
    try:
        with safe_open(objects.path(hash), framework="pt", device="cpu") as f:
            for name in specs if names is None else names:
                if name not in cuts:
                    out[name] = f.get_tensor(name).to(device)
                    continue
                lo, hi = cuts[name]
                if len(specs[name][1]) < 2 or not 0 <= lo <= hi <= specs[name][1][1]:
                    raise ValueError(f"columns [{lo}, {hi}) are not in tensor {name!r} of shape {specs[name][1]}")
                out[name] = f.get_slice(name)[:, lo:hi].contiguous().to(device)
    except (SafetensorError, RuntimeError, KeyError) as exc:
        raise CorruptObjectError(f"object {hash} cannot be parsed: {exc}", hash=hash) from exc
    return out


def load(objects: ObjectStore, info: ShardInfo, device: str | torch.device = "cpu", verify: bool = True,
         columns: Columns | None = None) -> Tensors:
    """The tensors of a shard that is not a delta (sliced or not), only ``columns`` of the
    tensors it names when given; parts that hold none of those columns are not read.
    Read objects are re-hashed when ``verify``."""
    want = {} if columns is None else {n: (columns.start, columns.end) for n in columns.names}
    if not info.parts:
        return _read(objects, info.object_hash, device, verify, want)
    split = None
    if columns is not None:  # the parts that hold those columns, or (none: empty columns) the first for the shapes
        needed = [p for p in info.parts if max(columns.start, p.col_start) < min(columns.end, p.col_end)]
        split = _assembled(objects, info, needed or info.parts[:1])
    if split is None or not split.keys() <= want.keys():  # a split tensor is wanted whole: every part
        split = _assembled(objects, info)
    out = _read(objects, info.object_hash, device, verify, {n: c for n, c in want.items() if n not in split})
    ranges = {n: want.get(n, (0, spec[1][1])) for n, spec in split.items()}
    for name, (lo, hi) in ranges.items():
        if not 0 <= lo <= hi <= split[name][1][1]:
            raise ValueError(f"columns [{lo}, {hi}) are not in tensor {name!r} of shape {split[name][1]}")
    pieces: dict[str, list[torch.Tensor]] = {n: [] for n in split}
    for part in info.parts:
        cuts = {n: (max(lo, part.col_start) - part.col_start, min(hi, part.col_end) - part.col_start)
                for n, (lo, hi) in ranges.items() if max(lo, part.col_start) < min(hi, part.col_end)}
        if not cuts:
            continue  # none of its columns wanted: not read
        partial = {n: c for n, c in cuts.items() if c != (0, part.col_end - part.col_start)}
        for name, t in _read(objects, part.object_hash, device, verify, partial, names=list(cuts)).items():
            pieces[name].append(t)
    for name, got in pieces.items():
        dtype, shape = split[name]
        lo, hi = ranges[name]
        if not got:
            out[name] = torch.empty((shape[0], hi - lo, *shape[2:]), dtype=dtype, device=device)
        else:
            out[name] = got[0] if len(got) == 1 else torch.cat(got, dim=1)  # (rows, hi - lo, ...)
    return out


def cut(tensors: Tensors, columns: Columns) -> Tensors:
    """``tensors`` with those ``columns`` names restricted to its columns (copies)."""
    return {n: t[:, columns.start : columns.end].contiguous() if n in columns.names else t for n, t in tensors.items()}


# ------------------------------------------------------------------ maintenance
def part_hashes(session: Session) -> dict[int, list[str]]:
    """Shard id -> the object hashes of its parts (sliced shards only)."""
    out: dict[int, list[str]] = {}
    for shard_id, hash in session.execute(select(ShardPart.shard_id, ShardPart.object_hash).order_by(ShardPart.shard_id, ShardPart.position)):
        out.setdefault(shard_id, []).append(hash)
    return out


def problems(session: Session, objects: ObjectStore, broken: Collection[str]) -> list[tuple[int, str | None, str]]:
    """(shard id, object hash or None, what) for every sliced shard whose parts do not tile its
    columns or do not fit together; shards with a missing or corrupt object (in ``broken``,
    reported already) are skipped."""
    out: list[tuple[int, str | None, str]] = []
    by_shard: dict[int, list[Any]] = {}
    for part in session.scalars(select(ShardPart).order_by(ShardPart.shard_id, ShardPart.position)):
        by_shard.setdefault(part.shard_id, []).append(part)
    for shard_id, rows in sorted(by_shard.items()):
        if [p.position for p in rows] != list(range(len(rows))):
            out.append((shard_id, None, f"sliced shard {shard_id} has parts at positions {[p.position for p in rows]}"))
            continue
        parts = [PartInfo(p.col_start, p.col_end, p.object_hash, p.object_bytes) for p in rows]
        if any(p.object_hash in broken for p in parts):
            continue
        try:
            _part_specs(objects, parts, f"sliced shard {shard_id}")
        except (ValueError, CorruptObjectError) as exc:
            out.append((shard_id, getattr(exc, "hash", None), str(exc)))
    return out
