"""Wire a :class:`PEERLM` to the expert store: commit a model as a version, check one out.

A version holds, per PEER layer, its shards (a block of rows: their row keys and the ``u``,
``v`` of all their experts) and, in the dense-weights object, everything else (attention,
dense FFNs, query nets and BatchNorm, the column codebook). The version's config JSON holds
the model config and each layer's geometry (rows, frozen rows, whether ``C2`` is frozen), so a
checkout rebuilds exactly the committed model: same outputs bit for bit on the same device.

This module is the only bridge between model and store: the model knows row ranges, never
stored shard ids. :func:`checkout_model` returns, with the model, a :class:`ShardMap` from
each layer's row ranges to the stored shards they came from; :func:`commit_model` takes it
and commits each row range as cheaply as is exact:

- frozen at checkout and now: the stored shard as it is (``ExistingShard``; frozen tensors
  are never written, so nothing is read, rewritten or re-hashed);
- trainable at checkout: compared with the stored bytes row by row; unchanged -> the stored
  shard; at most ``DELTA_MAX_SHARE`` of its rows changed (a sparse update) -> a
  ``DeltaShard`` of just those rows on top of it; otherwise written anew.

Expert parallel (each process holds a column slice of every table): every process writes its
columns of each shard to be written as a part (:func:`write_slices`), and the committing one
commits a ``SlicedShard`` naming every process's parts, so no process ever holds a whole
table; the stored shard reads back whole (or as any column slice) at any world size, and a
sliced checkout (``expert_slice``) reads only its columns. Sliced commits write no deltas.

On checkout, frozen shards stay resident (as views of the layer's table) so moving between
versions that share them reads only the differing shards from disk.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from expert_store import (Columns, DeltaShard, ExistingShard, ExpertStore, NewShard, PartInfo, Residency, SlicedShard,
                          StoreError, StoreWriteError, VersionInfo)

from .branches import pop_branches
from .config import ModelConfig, config_from_dict, config_to_dict
from .errors import LifelongError
from .model import PEERLM, resolve_device
from .peer import PEERLayer, Shard

__all__ = ["ShardMap", "commit_model", "checkout_model", "write_slices", "init_store", "StoreMismatchError"]

_GROWING = ("n_rows",)  # config fields that change as the model grows

RowRange = tuple[str, int, int]  # (layer name, row_start, row_end)


class StoreMismatchError(LifelongError):
    """The model's configuration does not match the store's."""


@dataclass(frozen=True)
class ShardMap:
    """A model's origin in the store: its version, and the stored shard of each row range."""

    version: VersionInfo
    shards: dict[RowRange, int]  # row range -> stored shard id
    frozen: frozenset[RowRange]  # the ranges that were frozen in that version

    @classmethod
    def of(cls, info: VersionInfo) -> ShardMap:
        geometry: dict[str, dict[str, Any]] = info.config.get("layers", {})
        shards = {(s.layer, s.row_start, s.row_end): s.id for s in info.shards}
        frozen = frozenset(r for r in shards if r[2] <= int(geometry.get(r[0], {}).get("frozen_rows", 0)))
        return cls(info, shards, frozen)


def _fixed(config: dict[str, Any]) -> dict[str, Any]:
    """The parts of a model config that must never change within a store."""
    out = dict(config)
    out["peer"] = {k: v for k, v in config["peer"].items() if k not in _GROWING}
    return out


def _geometry(model: PEERLM) -> dict[str, dict[str, Any]]:
    return {
        name: {
            "n_rows": layer.n_rows,
            "frozen_rows": layer.frozen_rows,
            "col_keys_frozen": not layer.col_keys.requires_grad,
            "query_frozen": layer.query_frozen,
            "shards": [[s.row_start, s.row_end] for s in layer.shards],
        }
        for name, layer in model.peer_layers().items()
    }


def _check_matches(store: ExpertStore, model: PEERLM) -> None:
    expected = store.config.get("model")
    actual = config_to_dict(model.config)
    if expected is not None and _fixed(expected) != _fixed(actual):
        diffs = sorted(
            k for k in set(_fixed(expected)) | set(_fixed(actual)) if _fixed(expected).get(k) != _fixed(actual).get(k)
        )
        raise StoreMismatchError(
            f"the model's configuration does not match the store at {store.path} (differs in: {', '.join(diffs)})"
        )


DELTA_MAX_SHARE = 0.25  # a changed shard is stored as a delta while at most this share of its rows changed


def _frozen_since(origin: ShardMap | None, key: RowRange, shard: Shard) -> bool:
    """Frozen in ``origin`` and now: never written since, so committed as the stored shard."""
    return origin is not None and key in origin.shards and shard.frozen and key in origin.frozen


def _stored_as(store: ExpertStore, origin: ShardMap | None, key: RowRange, shard: Shard,
               tensors: dict[str, torch.Tensor]) -> ExistingShard | DeltaShard | None:
    """How to commit ``shard``: as the stored shard it still is, as a delta of the few rows that
    changed since, or (None) written anew."""
    if origin is None or key not in origin.shards:
        return None
    shard_id = origin.shards[key]
    if _frozen_since(origin, key, shard):
        return ExistingShard(shard_id)
    try:  # trainable in that version: compare with the stored bytes, row by row
        stored = store.load_shard(shard_id, verify=False)
    except StoreError:
        return None
    if stored.keys() != tensors.keys() or any(stored[k].shape != t.shape or stored[k].dtype != t.dtype for k, t in tensors.items()):
        return None
    rows: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, t in tensors.items():
        t = t.detach().cpu()
        changed = (stored[name] != t).reshape(t.shape[0], -1).any(dim=1).nonzero().squeeze(1)  # (R,) rows that differ
        if changed.numel() > DELTA_MAX_SHARE * t.shape[0]:
            return None
        if changed.numel():
            rows[name] = (changed, t[changed].contiguous())
    return DeltaShard(shard_id, rows, frozen=shard.frozen) if rows else ExistingShard(shard_id)


def _shard_tensors(layer: PEERLayer, shard: Shard) -> dict[str, torch.Tensor]:
    n2 = layer.n_cols
    a, b = shard.row_start * n2, shard.row_end * n2
    return {
        "row_keys": layer.all_row_keys().detach()[shard.row_start : shard.row_end].contiguous(),  # (r, dk/2)
        "u": layer.expert_u[a:b],  # (r * n2, d) view: no copy before the write
        "v": layer.expert_v[a:b],
    }


def write_slices(store: ExpertStore, model: PEERLM, origin: ShardMap | None = None) -> dict[RowRange, PartInfo]:
    """Expert parallel, on every process: write this process's columns of ``u`` and ``v`` of
    each shard the commit writes (all but those frozen since ``origin``) as parts. The parts
    of every process, gathered, go to :func:`commit_model` as ``slices``."""
    out: dict[RowRange, PartInfo] = {}
    for name, layer in model.peer_layers().items():
        sl = layer.expert_slice
        if sl is None:
            continue
        n2 = layer.n_cols
        for shard in layer.shards:
            key = (name, shard.row_start, shard.row_end)
            if not _frozen_since(origin, key, shard):
                a, b = shard.row_start * n2, shard.row_end * n2
                out[key] = store.write_part(sl.lo, sl.hi, {"u": layer.expert_u[a:b], "v": layer.expert_v[a:b]})  # (r*n2, d/P)
    return out


def _sliced(store: ExpertStore, origin: ShardMap | None, key: RowRange, shard: Shard, layer: PEERLayer,
            slices: dict[RowRange, list[PartInfo]] | None) -> ExistingShard | SlicedShard:
    """How to commit a shard of a sliced layer: the stored shard (frozen since, or the same
    parts and row keys), else a sliced shard of every process's parts."""
    if _frozen_since(origin, key, shard):
        return ExistingShard(origin.shards[key])  # type: ignore[union-attr]
    if slices is None or key not in slices:
        raise LifelongError(f"layer {key[0]} rows {key[1]}..{key[2]}: its experts are split across processes but no "
                            "process wrote its columns (write_slices on every process before the commit)")
    row_keys = layer.all_row_keys().detach()[shard.row_start : shard.row_end].contiguous()  # (r, dk/2)
    parts = list(slices[key])
    stored = next((s for s in origin.version.shards if s.id == origin.shards.get(key)), None) if origin else None
    if stored is not None and stored.is_sliced and [(p.col_start, p.col_end, p.object_hash) for p in stored.parts] == [
            (p.col_start, p.col_end, p.object_hash) for p in parts]:  # unchanged: reuse (reads the row keys only)
        kept = store.load_shard(stored, columns=Columns(0, 0, ("u", "v")))
        if kept.keys() == {"row_keys", "u", "v"} and torch.equal(kept["row_keys"], row_keys.cpu()):
            return ExistingShard(stored.id)
    return SlicedShard(layer=key[0], row_start=shard.row_start, row_end=shard.row_end,
                       n_experts=(shard.row_end - shard.row_start) * layer.n_cols, tensors={"row_keys": row_keys},
                       parts=parts, frozen=shard.frozen)


def commit_model(
    store: ExpertStore,
    model: PEERLM,
    *,
    message: str,
    origin: ShardMap | None = None,
    parent: int | None | str = "HEAD",
    metrics: dict[str, Any] | None = None,
    cursors: dict[str, Any] | None = None,
    ref: str | None = "HEAD",
    created_by: str | None = None,
    optimizer: dict[str, torch.Tensor] | None = None,
    run_config: dict[str, Any] | None = None,
    slices: dict[RowRange, list[PartInfo]] | None = None,
) -> ShardMap:
    """Commit ``model`` as a new version on top of ``parent`` (default: HEAD) and move ``ref``.

    ``origin`` (from :func:`checkout_model` or a previous commit) lets unchanged frozen row
    ranges be committed as the shards they already are. ``optimizer`` (flat tensors, e.g.
    :attr:`TrainResult.optimizer_state`) is stored with the version so that the next training
    run can resume its optimizer state; ``run_config`` (the resolved config of the run that
    made the version, e.g. the cycle's) goes into the version's config as ``"run"``.
    ``slices`` (expert parallel: every process's :func:`write_slices`, gathered, each row
    range's parts in column order) commits the shards of sliced layers from their parts.
    Returns the new version's :class:`ShardMap`.
    """
    _check_matches(store, model)
    if parent == "HEAD":
        parent = store.head()
    shards: list[NewShard | ExistingShard | DeltaShard | SlicedShard] = []
    for name, layer in model.peer_layers().items():
        for shard in layer.shards:
            if layer.expert_slice is not None:  # no process holds the whole table: commit the parts
                shards.append(_sliced(store, origin, (name, shard.row_start, shard.row_end), shard, layer, slices))
                continue
            tensors = _shard_tensors(layer, shard)
            stored = _stored_as(store, origin, (name, shard.row_start, shard.row_end), shard, tensors)
            if stored is not None:
                shards.append(stored)
                continue
            shards.append(
                NewShard(
                    layer=name,
                    row_start=shard.row_start,
                    row_end=shard.row_end,
                    n_experts=(shard.row_end - shard.row_start) * layer.n_cols,
                    tensors=tensors,
                    frozen=shard.frozen,
                )
            )
    dense = {k: v.detach() for k, v in model.dense_state_dict().items()}
    config: dict[str, Any] = {"model": config_to_dict(model.config), "layers": _geometry(model)}
    if run_config is not None:
        config["run"] = run_config
    info = store.commit(
        shards=shards,
        dense=dense,
        message=message,
        parent=parent,  # type: ignore[arg-type]
        metrics=metrics,
        cursors=cursors,
        config=config,
        optimizer=optimizer,
        ref=ref,
        created_by=created_by,
    )
    return ShardMap.of(info)


def _materialise(module: nn.Module, device: torch.device) -> None:
    """Replace meta tensors by empty ones on ``device`` (filled by load_state_dict next)."""
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None and p.is_meta:
                m._parameters[name] = nn.Parameter(torch.empty_like(p, device=device), requires_grad=p.requires_grad)
        for name, b in list(m._buffers.items()):
            if b is not None and b.is_meta:
                m._buffers[name] = torch.empty_like(b, device=device)


def checkout_model(
    store: ExpertStore,
    spec: int | str = "HEAD",
    *,
    device: str | torch.device | None = None,
    residency: Residency | None = None,
    expert_slice: tuple[int, int, Any] | None = None,
) -> tuple[PEERLM, ShardMap]:
    """Build the model of version ``spec`` on ``device`` (default: GPU if there is one).

    Returns the model and its :class:`ShardMap` (``.version`` is the version's info): pass
    that to :func:`commit_model`. Pass the same ``residency`` across checkouts to reuse
    resident frozen shards; its byte budget (if any) is enforced before anything is loaded.
    ``expert_slice`` (rank, world, process group): expert parallel, only this rank's columns
    of every expert table are read (:meth:`PEERLayer.slice_experts`; no residency).
    """
    info = store.version(spec)
    device = resolve_device(device)
    cfg = config_from_dict(ModelConfig, info.config["model"])
    geometry: dict[str, dict[str, Any]] = info.config.get("layers", {})
    with torch.device("meta"):
        model = PEERLM(cfg)
    layers = model.peer_layers()
    if expert_slice is None:
        residency = residency or Residency(store, device)
        loaded = residency.checkout(info).layers
    else:
        loaded = {}
        for name, layer in layers.items():
            layer.slice_experts(*expert_slice)  # on meta tensors: sets the slice, nothing is allocated
            sl = layer.expert_slice
            loaded[name] = [(s, store.load_shard(s, device, columns=Columns(sl.lo, sl.hi, ("u", "v"))))  # type: ignore[union-attr]
                            for s in info.shards if s.layer == name]
    for name, layer in layers.items():
        geo = geometry.get(name)
        parts = loaded.get(name)
        if geo is None or not parts:
            raise LifelongError(f"version {info.id} has no shards for PEER layer {name}")
        parts = sorted(parts, key=lambda p: p[0].row_start)
        row_keys = torch.cat([t["row_keys"] for _, t in parts]).to(device)  # (n1, dk/2)
        u = torch.cat([t["u"] for _, t in parts]).to(device)  # (N, d), or (N, d/P) when sliced
        v = torch.cat([t["v"] for _, t in parts]).to(device)  # (N, d), or (N, d/P)
        frozen_rows = int(geo["frozen_rows"])
        shards = [Shard(s.row_start, s.row_end, frozen=s.row_end <= frozen_rows) for s, _ in parts]
        layer.load_tables(row_keys, frozen_rows, u, v, shards)
        if geo.get("col_keys_frozen"):
            layer.freeze_col_keys()
        if geo.get("query_frozen"):
            layer.freeze_query()
        # Keep frozen shards resident as views of the table (one copy in memory); drop
        # trainable ones: training changes them, so they cannot be reused as stored.
        n2 = layer.n_cols
        for s, _ in parts if expert_slice is None else ():
            if s.row_end <= frozen_rows:
                residency.adopt(s.id, {"row_keys": row_keys[s.row_start : s.row_end], "u": u[s.row_start * n2 : s.row_end * n2], "v": v[s.row_start * n2 : s.row_end * n2]})
            else:
                residency.evict([s.id])
    _materialise(model, device)
    dense = store.load_dense(info.id, device)
    model.branches = pop_branches(dense)  # none in versions made without policy branch
    for name, layer in layers.items():
        # Anchors vary in number and the background counts follow growth: take the stored
        # shapes. Versions made before either existed have none: empty anchors, zero counts.
        layer.anchors = dense.pop(f"{name}.anchors", layer.anchors.new_zeros(0, layer.config.d_key))
        layer.background = dense.pop(f"{name}.background", layer.background.new_zeros(layer.num_experts))
        # Before counting retrievals, a version counted batches (document = batch): the same
        # formula holds; the next cycle's retrieval counts then dominate.
        docs = dense.pop(f"{name}.background_docs", dense.pop(f"{name}.background_batches", None))
        layer.background_docs = docs if docs is not None else layer.background_docs.new_zeros(())
    missing, unexpected = model.load_state_dict(dense, strict=False)
    # Tables live in shards; anchors and background counts are absent from older versions.
    tables = ("expert_u", "expert_v", "row_keys", "frozen_row_keys", "anchors", "background", "background_docs")
    missing = [k for k in missing if not k.endswith(tables)]
    if missing or unexpected:
        raise LifelongError(f"version {info.id}: dense weights do not fit the model (missing {missing}, unexpected {unexpected})")
    return model, ShardMap.of(info)


def init_store(path: str, config: ModelConfig, *, url: str | None = None, seed: int = 0) -> tuple[ExpertStore, VersionInfo]:
    """Create a store holding a fresh model built from ``config`` as its first version.

    All or nothing for a store in its own directory (the default SQLite database): when the
    first commit fails (disk full) the new store is removed again, so running it again works.
    """
    torch.manual_seed(seed)
    model = PEERLM(config)
    new_dir = not Path(path).exists() or not any(Path(path).iterdir())
    store = ExpertStore.init(path, config={"model": config_to_dict(config)}, url=url)
    try:
        return store, commit_model(store, model, message="init: fresh model", parent=None).version
    except BaseException as exc:
        store.close()
        if url is None and new_dir:  # everything in it is what init just made
            shutil.rmtree(path, ignore_errors=True)
            if isinstance(exc, StoreWriteError):
                raise exc.with_outcome("no store was created") from exc
        raise
