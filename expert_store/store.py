"""The expert store: a directory of objects plus a database of shards, versions and refs.

The files on disk and how a store is created and opened are in :mod:`.layout`.

A commit writes its objects first, then inserts shard and version rows and moves the ref
(compare-and-swap) in one transaction. A crash before the transaction commits leaves only
unreachable objects, which :meth:`ExpertStore.gc` removes. Delta shards (changed rows on a
base shard) are in :mod:`.delta`.

A write that fails (disk full, an I/O error) raises :class:`StoreWriteError` in one line
saying what failed and what that left ("…; nothing was committed", "…; HEAD was not
moved"): every write is all or nothing, so the store is at the state before or after.
"""

from __future__ import annotations

import dataclasses
import getpass
import os
import socket
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any, Union

import torch
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from . import delta, layout, maintenance, slices
from .diff import VersionDiff, diff_versions
from .errors import CorruptObjectError, ReadOnlyStoreError, UnknownShardError, UnknownVersionError
from .ioerrors import write_guard
from .layout import FORMAT, MARKER, OBJECTS_DIR, stale_probes
from .validation import check_json, check_overlaps, check_tensors, dtype_name
from .objects import ObjectInfo, ObjectStore, run_writes
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
    ref_info,
    reflog_entry,
    shard_info,
    version_info,
)
from .refs import HEAD, create_tag, move_ref, resolve
from .schema import WRITE, Ref, Reflog, Shard, Version, VersionShard, utcnow

__all__ = ["ExpertStore", "MARKER", "FORMAT"]

Spec = Union[int, str]

NOTHING_COMMITTED = "nothing was committed"
Tensors = dict[str, torch.Tensor]


def default_who() -> str:
    """``user@host``, for reflog entries."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


class ExpertStore:
    """A versioned store of expert shards. Create with :meth:`init`, reopen with :meth:`open`."""

    def __init__(self, path: Path, engine: Engine, config: dict[str, Any], store_id: str, read_only: bool = False,
                 *, database: str = "default") -> None:
        self.path = path
        self.engine = engine
        self.config = config
        self.store_id = store_id
        self.read_only = read_only
        self.objects = ObjectStore(path / OBJECTS_DIR)
        self._database = database
        self._writer = engine.execution_options(**{WRITE: True})

    # ---------------------------------------------------------------- create / open

    @classmethod
    def _from(cls, c: layout.Connected) -> ExpertStore:
        return cls(c.path, c.engine, c.config, c.store_id, c.read_only, database=c.database)

    @classmethod
    def init(cls, path: str | os.PathLike[str], config: dict[str, Any] | None = None, url: str | None = None) -> ExpertStore:
        """Create a new store at ``path`` (an absent or empty directory).

        ``url`` is any SQLAlchemy URL for the database; by default a SQLite file
        ``store.db`` inside ``path``. Raises :class:`StoreExistsError` if a store exists
        there (or in the database), :class:`ReadOnlyStoreError` if it cannot be written.
        """
        return cls._from(layout.create(Path(path), config, url))

    @classmethod
    def open(cls, path: str | os.PathLike[str], url: str | None = None, read_only: bool = False) -> ExpertStore:
        """Open the store at ``path``; :class:`NotAStoreError` if there is none.

        A store created with a ``url`` needs that ``url`` again (see :attr:`url`). With
        ``read_only`` (or when the directory cannot be written, e.g. a read-only
        filesystem) the store is opened for reading; every write raises
        :class:`ReadOnlyStoreError`.
        """
        return cls._from(layout.connect(Path(path), url, read_only))

    @property
    def url(self) -> str | None:
        """What to pass as ``url`` to :meth:`open` in another process: None when the
        database is the default ``store.db`` inside :attr:`path` (however it was opened),
        else the SQLAlchemy URL, password included."""
        if self._database == "default":
            return None
        return self.engine.url.render_as_string(hide_password=False)

    def close(self) -> None:
        """Release database connections."""
        self.engine.dispose()

    def __enter__(self) -> ExpertStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ExpertStore({str(self.path)!r})"

    # ---------------------------------------------------------------- sessions

    def _read(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    def _require_writable(self) -> None:
        if self.read_only:
            raise ReadOnlyStoreError(f"the store at {self.path} is open read-only; nothing was changed")

    @contextmanager
    def _write(self, what: str, outcome: str) -> Iterator[Session]:
        """One write transaction (``BEGIN IMMEDIATE`` on SQLite); commit on success. A failed
        write raises :class:`StoreWriteError` "… while ``what`` …; ``outcome``"."""
        self._require_writable()
        with write_guard(what, outcome, self.path), Session(self._writer, expire_on_commit=False) as session:
            with session.begin():
                yield session

    # ---------------------------------------------------------------- commit

    def commit(
        self,
        *,
        shards: Sequence[NewShard | ExistingShard | DeltaShard | SlicedShard],
        dense: dict[str, torch.Tensor],
        message: str,
        parent: int | None,
        metrics: dict[str, Any] | None = None,
        cursors: dict[str, Any] | None = None,
        config: dict[str, Any] | None = None,
        optimizer: dict[str, torch.Tensor] | None = None,
        ref: str | None = HEAD,
        who: str | None = None,
        created_by: str | None = None,
    ) -> VersionInfo:
        """Store a new version and move ``ref`` to it.

        New shards and the dense (and optimizer) tensors are written as objects first; then
        one transaction inserts the rows and compare-and-swaps ``ref``: if the ref exists
        it must still point at ``parent`` (else :class:`ConflictError`, nothing changes);
        if it does not exist it is created. ``ref=None`` moves no ref.

        A :class:`DeltaShard` is checked against its stored base before anything is
        written, then stored as a delta object, or, when its chain would pass
        :data:`~expert_store.delta.MAX_DELTA_CHAIN` deltas, as the full tensors (compaction).
        A :class:`SlicedShard`'s parts (written before, :meth:`write_part`) are checked to
        exist and fit together; its whole tensors are written as its own object.
        """
        self._require_writable()
        metrics = check_json("metrics", metrics)
        cursors = check_json("cursors", cursors)
        config = check_json("config", config)
        check_tensors(shards, dense)
        bases = {id(s): delta.check_base(self, s) for s in shards if isinstance(s, DeltaShard)}
        sliced = {id(s): slices.check(self.objects, s) for s in shards if isinstance(s, SlicedShard)}

        jobs: dict[object, Callable[[], tuple[ObjectInfo, bool]]] = {"dense": partial(_put, self.objects, dense)}
        if optimizer:
            jobs["optimizer"] = partial(_put, self.objects, optimizer)
        for s in shards:
            if isinstance(s, (NewShard, SlicedShard)):
                jobs[id(s)] = partial(_put, self.objects, s.tensors)
            elif isinstance(s, DeltaShard):
                jobs[id(s)] = partial(delta.write, self, s, bases[id(s)])
        with write_guard(f"writing the objects of a commit into {self.objects.root}", NOTHING_COMMITTED):
            written = run_writes(jobs)  # id(shard) | "dense" | "optimizer" -> (object, compacted)
        dense_obj = written["dense"][0]
        optimizer_hash = written["optimizer"][0].hash if optimizer else None

        now = utcnow()
        who = who or default_who()
        with self._write("recording the version in the store database", NOTHING_COMMITTED) as session:
            if parent is not None and session.get(Version, parent) is None:
                raise UnknownVersionError(f"parent version {parent} does not exist")
            rows: list[Shard] = []
            for shard in shards:
                if isinstance(shard, ExistingShard):
                    row = session.get(Shard, shard.shard_id)
                    if row is None:
                        raise UnknownShardError(f"shard {shard.shard_id} does not exist")
                else:
                    row = (slices.shard_row(shard, written[id(shard)][0].hash, sliced[id(shard)], created_by, now)
                           if isinstance(shard, SlicedShard) else
                           _shard_row(shard, *written[id(shard)], bases.get(id(shard)), created_by, now))
                    session.add(row)
                rows.append(row)
            check_overlaps(rows)
            version = Version(
                parent_id=parent,
                message=message,
                created_at=now,
                dense_hash=dense_obj.hash,
                optimizer_hash=optimizer_hash,
                config=config,
                metrics=metrics,
                cursors=cursors,
            )
            session.add(version)
            session.flush()
            session.add_all(
                VersionShard(version_id=version.id, position=i, shard_id=row.id) for i, row in enumerate(rows)
            )
            if ref is not None:
                exists = session.get(Ref, ref) is not None
                move_ref(
                    session, ref, version.id, expected=parent if exists else None, who=who,
                    why=f"commit: {message}",
                )
            session.flush()
            session.refresh(version)
            return version_info(version)

    # ---------------------------------------------------------------- addressing and history

    def resolve(self, spec: Spec) -> int:
        """Version id named by ``spec`` (id, ``"v12"``, ref/tag, ``"HEAD~2"``)."""
        with self._read() as session:
            return resolve(session, spec)

    def head(self) -> int | None:
        """The version HEAD points at, or None in an empty store."""
        with self._read() as session:
            ref = session.get(Ref, HEAD)
            return ref.version_id if ref is not None else None

    def version(self, spec: Spec = HEAD) -> VersionInfo:
        with self._read() as session:
            return version_info(session.get(Version, resolve(session, spec)))

    def versions(self) -> list[VersionInfo]:
        """All versions, oldest first."""
        with self._read() as session:
            return [version_info(v) for v in session.scalars(select(Version).order_by(Version.id))]

    def log(self, spec: Spec = HEAD, limit: int | None = None) -> list[VersionInfo]:
        """The first-parent chain from ``spec`` back to the root, newest first."""
        out: list[VersionInfo] = []
        with self._read() as session:
            row = session.get(Version, resolve(session, spec))
            while row is not None and (limit is None or len(out) < limit):
                out.append(version_info(row))
                row = session.get(Version, row.parent_id) if row.parent_id is not None else None
        return out

    def diff(self, a: Spec, b: Spec) -> VersionDiff:
        """What changed from version ``a`` to version ``b``."""
        return diff_versions(self.version(a), self.version(b))

    def shard(self, shard_id: int) -> ShardInfo:
        with self._read() as session:
            row = session.get(Shard, shard_id)
            if row is None:
                raise UnknownShardError(f"shard {shard_id} does not exist")
            return shard_info(row)

    def shard_chain(self, shard: int | ShardInfo) -> list[ShardInfo]:
        """A shard and the bases it is a delta on: full base first, the shard itself last."""
        with self._read() as session:
            return delta.chain(session, shard.id if isinstance(shard, ShardInfo) else shard)

    def shard_versions(self, shard_id: int) -> list[int]:
        """Ids of the versions that contain shard ``shard_id``."""
        with self._read() as session:
            stmt = select(VersionShard.version_id).where(VersionShard.shard_id == shard_id).order_by(VersionShard.version_id)
            return list(session.scalars(stmt))

    # ---------------------------------------------------------------- refs

    def refs(self) -> list[RefInfo]:
        with self._read() as session:
            return [ref_info(r) for r in session.scalars(select(Ref).order_by(Ref.name))]

    def reflog(self, ref: str | None = None) -> list[ReflogEntry]:
        """Ref moves, newest first (all refs, or only ``ref``)."""
        stmt = select(Reflog).order_by(Reflog.id.desc())
        if ref is not None:
            stmt = stmt.where(Reflog.ref == ref)
        with self._read() as session:
            return [reflog_entry(r) for r in session.scalars(stmt)]

    def set_ref(self, name: str, version: Spec, expected_old: int | None, *, who: str | None = None, why: str = "set-ref") -> int:
        """Compare-and-swap ref ``name`` from ``expected_old`` (None: must not exist) to ``version``."""
        with self._write(f"moving ref {name!r}", f"ref {name!r} was not moved") as session:
            target = resolve(session, version)
            move_ref(session, name, target, expected=expected_old, who=who or default_who(), why=why)
            return target

    def rollback(self, spec: Spec, *, ref: str = HEAD, why: str = "rollback", who: str | None = None) -> int:
        """Move ``ref`` to the version ``spec`` names (older or newer); nothing is deleted."""
        with self._write(f"moving {ref}", f"{ref} was not moved") as session:
            target = resolve(session, spec)
            current = session.get(Ref, ref)
            if current is None:
                raise UnknownVersionError(f"ref {ref!r} does not exist")
            move_ref(session, ref, target, expected=current.version_id, who=who or default_who(), why=why)
            return target

    def tag(self, name: str, spec: Spec = HEAD, *, who: str | None = None, why: str = "tag") -> int:
        """Create the fixed tag ``name`` at the version ``spec`` names."""
        with self._write(f"creating tag {name!r}", f"no tag {name!r} was made") as session:
            target = resolve(session, spec)
            create_tag(session, name, target, who=who or default_who(), why=why)
            return target

    # ---------------------------------------------------------------- loading

    def write_part(self, col_start: int, col_end: int, tensors: Mapping[str, torch.Tensor]) -> PartInfo:
        """Write columns ``[col_start, col_end)`` (dim 1) of a shard's split tensors as an
        object, for a later :class:`SlicedShard` (see :mod:`.slices`). Several processes may
        write parts at once; a part no version names is removed by :meth:`gc`."""
        self._require_writable()
        slices.check_part(col_start, col_end, tensors)
        with write_guard(f"writing columns {col_start}..{col_end} of a shard into {self.objects.root}", NOTHING_COMMITTED):
            obj = self.objects.put(tensors)
        return PartInfo(col_start, col_end, obj.hash, obj.payload_bytes)

    def load_shard(self, shard: int | ShardInfo, device: str | torch.device = "cpu", verify: bool = True,
                   *, resident: Mapping[int, Tensors] | None = None, columns: slices.Columns | None = None) -> Tensors:
        """The tensors of a shard on ``device``, a delta shard's chain applied (bit-identical).

        Every object read is re-hashed when ``verify``; :class:`CorruptObjectError` names
        the shard, the chain member at fault and the versions that need it. ``resident``
        (shard id -> tensors in memory that equal the stored ones, e.g. a
        :class:`Residency`'s): the newest shard of the chain found there is copied instead
        of read, and only the deltas after it are read and applied. ``columns``: only those
        columns of the tensors it names (a sliced shard reads only the parts that hold them,
        a full one only those columns; a delta shard is loaded whole, then cut).
        """
        info = shard if isinstance(shard, ShardInfo) else self.shard(shard)
        if columns is None or info.base_id is not None:
            tensors = delta.load(self, info, device, verify, resident)
            return tensors if columns is None else slices.cut(tensors, columns)
        try:
            return slices.load(self.objects, info, device, verify, columns)
        except CorruptObjectError as exc:
            raise delta.shard_error(self, info, info, exc) from exc

    def load_dense(self, version: Spec = HEAD, device: str | torch.device = "cpu", verify: bool = True) -> dict[str, torch.Tensor]:
        """The dense (non-expert) weights of a version."""
        info = self.version(version)
        return self._load_version_object(info, info.dense_hash, "dense weights", device, verify)

    def load_optimizer(self, version: Spec = HEAD, device: str | torch.device = "cpu", verify: bool = True) -> dict[str, torch.Tensor] | None:
        """The optimizer tensors of a version, or None when it was committed without them."""
        info = self.version(version)
        if info.optimizer_hash is None:
            return None
        return self._load_version_object(info, info.optimizer_hash, "optimizer state", device, verify)

    def _load_version_object(self, info: VersionInfo, hash: str, what: str, device: str | torch.device, verify: bool) -> dict[str, torch.Tensor]:
        try:
            return self.objects.load(hash, device, verify)
        except CorruptObjectError as exc:
            raise type(exc)(f"{what} of version {info.id}: {exc}", hash=hash, version_ids=(info.id,)) from exc

    # ---------------------------------------------------------------- maintenance

    def verify(self) -> list[Problem]:
        """Re-hash every referenced object and check every row; an empty list means healthy."""
        with self._read() as session:
            return maintenance.verify(session, self.objects)

    def gc(self, dry_run: bool = False, grace_s: float = maintenance.GC_GRACE_S) -> GcResult:
        """Delete objects no row references and leftover temp files older than ``grace_s``.

        The grace period protects objects a concurrent commit has written but not yet
        recorded; pass ``grace_s=0`` when no commit can be running. Probe files an open of
        the store could not remove are temp files too. A failed delete raises
        :class:`StoreWriteError`; what was deleted was unreachable, so running gc again
        finishes the job.
        """
        if not dry_run:
            self._require_writable()
        with write_guard(f"deleting unreachable files in {self.path}", "no version was changed; run gc again to finish"):
            with self._read() as session:
                result = maintenance.gc(session, self.objects, dry_run=dry_run, grace_s=grace_s)
            probes = [p for p in stale_probes(self.path) if self.objects.age(p) >= grace_s]
            if not dry_run:
                for probe in probes:
                    probe.unlink(missing_ok=True)
        if probes:
            result = dataclasses.replace(result, temp_files=result.temp_files + probes)
        return result


def _put(objects: ObjectStore, tensors: Mapping[str, torch.Tensor]) -> tuple[ObjectInfo, bool]:
    return objects.put(tensors), False


def _shard_row(shard: NewShard | DeltaShard, obj: ObjectInfo, compacted: bool, base: ShardInfo | None,
               created_by: str | None, now: datetime) -> Shard:
    """The row of a written shard: new, a delta on ``base``, or a delta written in full (compacted)."""
    common: dict[str, Any] = {"object_hash": obj.hash, "object_bytes": obj.payload_bytes, "frozen": shard.frozen,
                              "created_by": created_by, "created_at": now}
    if isinstance(shard, NewShard):
        return Shard(layer=shard.layer, row_start=shard.row_start, row_end=shard.row_end,
                     n_experts=shard.n_experts, dtype=dtype_name(shard.tensors), bytes=obj.payload_bytes,
                     base_id=None, depth=0, **common)
    assert base is not None
    return Shard(layer=base.layer, row_start=base.row_start, row_end=base.row_end, n_experts=base.n_experts,
                 dtype=base.dtype, bytes=base.bytes, base_id=None if compacted else base.id,
                 depth=0 if compacted else base.depth + 1, **common)
