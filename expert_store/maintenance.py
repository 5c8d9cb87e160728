"""Store maintenance: ``verify`` (re-hash and cross-check) and ``gc`` (remove unreachable).

Every object a row references is reachable: versions and shard rows are never deleted,
so a shard or dense object stays reachable once a version that uses it is committed, and
so does every base of a delta shard (each base is itself a shard row). Objects no row
references are leftovers of commits that crashed or lost their compare-and-swap.

An object's users include the delta shards built on its shard (at any depth) and their
versions: a broken base breaks them too.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from . import delta, slices
from .errors import CorruptObjectError, MissingObjectError, StoreError
from .objects import ObjectStore
from .records import GcResult, Problem
from .schema import Ref, Shard, Version, VersionShard

__all__ = ["GC_GRACE_S", "verify", "gc", "referenced_objects"]

#: Unreferenced objects younger than this are spared by gc (a commit may be in flight).
GC_GRACE_S = 15 * 60.0


@dataclass
class _Users:
    """Who references one object."""

    shard_ids: set[int] = field(default_factory=set)
    version_ids: set[int] = field(default_factory=set)


def _chain_ids(base_of: dict[int, int | None], shard_id: int) -> list[int]:
    """``shard_id`` and its bases that exist (stops at a missing base or a loop)."""
    out: list[int] = []
    next_id: int | None = shard_id
    while next_id is not None and next_id in base_of and next_id not in out:
        out.append(next_id)
        next_id = base_of[next_id]
    return out


def referenced_objects(session: Session) -> dict[str, _Users]:
    """Every object hash any row references, with the shards and versions that need it
    (a delta shard and its versions need every object of its chain; a sliced shard's its parts)."""
    users: dict[str, _Users] = defaultdict(_Users)
    hash_of: dict[int, str] = {}
    base_of: dict[int, int | None] = {}
    for shard_id, hash, base_id in session.execute(select(Shard.id, Shard.object_hash, Shard.base_id)):
        hash_of[shard_id], base_of[shard_id] = hash, base_id
    parts_of = slices.part_hashes(session)
    for shard_id in hash_of:
        for member in _chain_ids(base_of, shard_id):
            for hash in (hash_of[member], *parts_of.get(member, ())):
                users[hash].shard_ids.add(shard_id)
    for version_id, shard_id in session.execute(select(VersionShard.version_id, VersionShard.shard_id)):
        for member in _chain_ids(base_of, shard_id):
            for hash in (hash_of[member], *parts_of.get(member, ())):
                users[hash].version_ids.add(version_id)
    for version_id, dense, optimizer in session.execute(
        select(Version.id, Version.dense_hash, Version.optimizer_hash)
    ):
        users[dense].version_ids.add(version_id)
        if optimizer is not None:
            users[optimizer].version_ids.add(version_id)
    return users


def _check_rows(session: Session) -> list[Problem]:
    """Rows that point nowhere (databases without enforced foreign keys) or make no sense."""
    problems: list[Problem] = []
    version_ids = set(session.scalars(select(Version.id)))
    for ref in session.scalars(select(Ref)):
        if ref.version_id not in version_ids:
            problems.append(Problem("bad-row", f"ref {ref.name!r} points at missing version {ref.version_id}"))
    for version_id, parent in session.execute(select(Version.id, Version.parent_id)):
        if parent is not None and parent not in version_ids:
            problems.append(Problem("bad-row", f"version {version_id} has missing parent {parent}", version_ids=(version_id,)))
    shard_ids = set(session.scalars(select(Shard.id)))
    for link in session.scalars(select(VersionShard)):
        if link.shard_id not in shard_ids:
            problems.append(Problem("bad-row", f"version {link.version_id} lists missing shard {link.shard_id}", version_ids=(link.version_id,)))
    for shard in session.scalars(select(Shard).where(Shard.row_end <= Shard.row_start)):
        problems.append(Problem("bad-row", f"shard {shard.id} has empty row range", shard_ids=(shard.id,)))
    shards = {row.id: row for row in session.scalars(select(Shard))}
    for row in shards.values():
        if row.base_id is None:
            continue
        base = shards.get(row.base_id)
        what = None
        if base is None:
            what = f"delta shard {row.id} has missing base shard {row.base_id}"
        elif base.id >= row.id:
            what = f"delta shard {row.id} has base shard {base.id}, which is not older"
        elif (base.layer, base.row_start, base.row_end, base.n_experts, base.dtype, base.bytes) != (
            row.layer, row.row_start, row.row_end, row.n_experts, row.dtype, row.bytes
        ):
            what = f"delta shard {row.id} does not match its base shard {base.id} (layer, rows, experts, dtype or bytes)"
        elif (row.depth or 0) != (base.depth or 0) + 1:
            what = f"delta shard {row.id} has depth {row.depth}, but its base shard {base.id} has depth {base.depth}"
        if what is not None:
            problems.append(Problem("bad-row", what, shard_ids=(row.id,)))
    return problems


def _check_deltas(session: Session, objects: ObjectStore, broken: set[str]) -> list[Problem]:
    """Every delta object applies to its chain: tensor names, dtypes, shapes, ids in range."""
    problems: list[Problem] = []
    for row in session.scalars(select(Shard).where(Shard.base_id.is_not(None)).order_by(Shard.id)):
        try:
            members = delta.chain(session, row.id)
        except StoreError:
            continue  # a missing base is a bad-row already
        if any(h in broken for m in members for h in (m.object_hash, *(p.object_hash for p in m.parts))):
            continue  # reported as a missing or corrupt object already
        try:
            base = slices.header(objects, members[0])
            own = objects.header(row.object_hash)
            names = list(delta.decode(dict.fromkeys(own, None)))
            ids = objects.load(row.object_hash, verify=False, names=[f"{n}.{delta.IDS}" for n in names])
            rows = {n: (ids[f"{n}.{delta.IDS}"], own[f"{n}.{delta.ROWS}"]) for n in names}
            found = delta.problems(base, rows)
        except (ValueError, CorruptObjectError) as exc:
            found = [str(exc)]
        if found:
            shard_ids, version_ids = delta.affected(session, row.id)
            problems.append(Problem(
                "bad-delta", f"delta shard {row.id} (on shard {row.base_id}, object {row.object_hash}): " + "; ".join(found),
                hash=row.object_hash, shard_ids=shard_ids, version_ids=version_ids,
            ))
    return problems


def verify(session: Session, objects: ObjectStore) -> list[Problem]:
    """Re-hash every referenced object; report missing or corrupt ones and bad rows."""
    problems = _check_rows(session)
    broken: set[str] = set()
    for hash, users in sorted(referenced_objects(session).items()):
        try:
            objects.check(hash)
            objects.header(hash)  # a right hash can still name a hostile header
        except CorruptObjectError as exc:
            broken.add(hash)
            kind = "missing-object" if isinstance(exc, MissingObjectError) else "corrupt-object"
            shards = ", ".join(map(str, sorted(users.shard_ids))) or "none"
            versions = ", ".join(map(str, sorted(users.version_ids))) or "none"
            problems.append(
                Problem(
                    kind,
                    f"{exc} (shards: {shards}; versions: {versions})",
                    hash=hash,
                    shard_ids=tuple(sorted(users.shard_ids)),
                    version_ids=tuple(sorted(users.version_ids)),
                )
            )
    for shard_id, hash, what in slices.problems(session, objects, broken):
        shard_ids, version_ids = delta.affected(session, shard_id)
        problems.append(Problem("bad-slices", what, hash=hash, shard_ids=shard_ids, version_ids=version_ids))
    return problems + _check_deltas(session, objects, broken)


def _old(objects: ObjectStore, path: Path, grace_s: float) -> int | None:
    """``path``'s size if it was last modified at least ``grace_s`` ago, else None (gone too)."""
    try:
        return path.stat().st_size if objects.age(path) >= grace_s else None
    except FileNotFoundError:
        return None


def gc(session: Session, objects: ObjectStore, *, dry_run: bool, grace_s: float) -> GcResult:
    """Remove objects no row references and stale temp files, both older than ``grace_s``.

    The grace is what protects a commit in flight: its objects are written (or, when they
    exist already, their mtime refreshed) before its rows, so until its transaction ends they
    are unreferenced but young. Each object's age is read right before it is deleted (not
    once for all up front), so an old one that a commit reuses while gc runs is spared too."""
    keep = set(referenced_objects(session))
    doomed: list[str] = []
    freed = 0
    for hash in objects.hashes():
        size = None if hash in keep else _old(objects, objects.path(hash), grace_s)
        if size is None:
            continue
        if not dry_run:
            objects.delete(hash)
        doomed.append(hash)
        freed += size
    temps = [(p, n) for p in objects.temp_files() if (n := _old(objects, p, grace_s)) is not None]
    freed += sum(n for _, n in temps)
    if not dry_run:
        for path, _ in temps:
            path.unlink(missing_ok=True)
    return GcResult(objects=doomed, temp_files=[p for p, _ in temps], bytes=freed, dry_run=dry_run)
