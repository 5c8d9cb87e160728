"""Store maintenance: ``verify`` (re-hash and cross-check) and ``gc`` (remove unreachable).

Every object a row references is reachable: versions are never deleted, so a shard or
dense object stays reachable once a version that uses it is committed. Objects no row
references are leftovers of commits that crashed or lost their compare-and-swap.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session

from .errors import CorruptObjectError, MissingObjectError
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


def referenced_objects(session: Session) -> dict[str, _Users]:
    """Every object hash any row references, with the shards and versions using it."""
    users: dict[str, _Users] = defaultdict(_Users)
    for shard_id, hash in session.execute(select(Shard.id, Shard.object_hash)):
        users[hash].shard_ids.add(shard_id)
    for version_id, hash in session.execute(
        select(VersionShard.version_id, Shard.object_hash).join(Shard, Shard.id == VersionShard.shard_id)
    ):
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
    return problems


def verify(session: Session, objects: ObjectStore) -> list[Problem]:
    """Re-hash every referenced object; report missing or corrupt ones and bad rows."""
    problems = _check_rows(session)
    for hash, users in sorted(referenced_objects(session).items()):
        try:
            objects.check(hash)
        except CorruptObjectError as exc:
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
    return problems


def gc(session: Session, objects: ObjectStore, *, dry_run: bool, grace_s: float) -> GcResult:
    """Remove objects no row references and stale temp files, both older than ``grace_s``."""
    keep = set(referenced_objects(session))
    doomed: list[str] = []
    freed = 0
    for hash in objects.hashes():
        path = objects.path(hash)
        if hash in keep or objects.age(path) < grace_s:
            continue
        doomed.append(hash)
        freed += path.stat().st_size
    temps = [p for p in objects.temp_files() if objects.age(p) >= grace_s]
    freed += sum(p.stat().st_size for p in temps)
    if not dry_run:
        for hash in doomed:
            objects.delete(hash)
        for path in temps:
            path.unlink(missing_ok=True)
    return GcResult(objects=doomed, temp_files=temps, bytes=freed, dry_run=dry_run)
