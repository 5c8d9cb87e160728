"""Bad input: each case gives a clear, specific error and leaves the store unchanged."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from expert_store import (
    ExpertStore,
    NotAStoreError,
    ReadOnlyStoreError,
    SchemaVersionError,
    StoreError,
    StoreExistsError,
    UnknownVersionError,
)
from expert_store.schema import Meta, SCHEMA_VERSION
from sqlalchemy import update
from sqlalchemy.orm import Session

from store_testlib import dense, new_shard

# SQLite files, SQLite URLs and read-only mounts; PostgreSQL's bad input is in test_backends.py.
pytestmark = pytest.mark.sqlite_only


def snapshot(path: Path) -> dict[str, str]:
    """Every file under ``path`` with a hash of its bytes (WAL side files excluded)."""
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file() and not p.name.endswith(("-wal", "-shm"))
    }


@pytest.fixture
def committed(store: ExpertStore) -> ExpertStore:
    store.commit(shards=[new_shard(0, 0)], dense=dense(0), message="one", parent=None)
    store.commit(shards=[new_shard(1, 4)], dense=dense(1), message="two", parent=1)
    return store


def test_unknown_versions_and_tags(committed: ExpertStore) -> None:
    with pytest.raises(UnknownVersionError, match="no ref or tag named 'nope'.*known: HEAD"):
        committed.resolve("nope")
    with pytest.raises(UnknownVersionError, match="there is no version 42"):
        committed.version("v42")
    with pytest.raises(UnknownVersionError, match="has no parent"):
        committed.resolve("HEAD~5")
    with pytest.raises(UnknownVersionError, match="cannot parse"):
        committed.resolve("HEAD~x")
    with pytest.raises(UnknownVersionError):
        committed.rollback("missing-tag")
    assert committed.head() == 2


def test_path_that_is_not_a_store(tmp_path: Path) -> None:
    with pytest.raises(NotAStoreError, match="not an expert store"):
        ExpertStore.open(tmp_path)
    (tmp_path / "store.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(NotAStoreError, match="not an expert store marker"):
        ExpertStore.open(tmp_path)
    (tmp_path / "store.json").write_text(json.dumps({"format": "expert_store", "store_id": "x"}))
    with pytest.raises(NotAStoreError, match="database is missing"):
        ExpertStore.open(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store.json"]  # nothing created


def test_init_on_existing_store_or_non_empty_dir(committed: ExpertStore, tmp_path: Path) -> None:
    before = snapshot(committed.path)
    with pytest.raises(StoreExistsError, match="already holds an expert store"):
        ExpertStore.init(committed.path, {"other": 1})
    assert snapshot(committed.path) == before
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(StoreExistsError, match="not an empty directory"):
        ExpertStore.init(busy, {})
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]


def test_init_on_database_that_already_holds_a_store(committed: ExpertStore, tmp_path: Path) -> None:
    url = f"sqlite:///{committed.path / 'store.db'}"
    with pytest.raises(StoreExistsError, match="database"):
        ExpertStore.init(tmp_path / "elsewhere", {}, url=url)


def test_newer_schema_version_is_refused(committed: ExpertStore) -> None:
    with Session(committed.engine) as session, session.begin():
        session.execute(update(Meta).where(Meta.key == "schema_version").values(value=str(SCHEMA_VERSION + 1)))
    with pytest.raises(SchemaVersionError, match="newer than this code"):
        ExpertStore.open(committed.path)


def test_read_only_database_refuses_writes(committed: ExpertStore) -> None:
    before = snapshot(committed.path)
    ro = ExpertStore.open(committed.path, read_only=True)
    assert ro.version("HEAD").id == 2 and ro.verify() == []
    for write in (
        lambda: ro.commit(shards=[new_shard(2, 8)], dense=dense(2), message="x", parent=2),
        lambda: ro.rollback(1),
        lambda: ro.tag("t", 1),
        lambda: ro.gc(grace_s=0),
    ):
        with pytest.raises(ReadOnlyStoreError, match="read-only"):
            write()
    ro.close()
    assert snapshot(committed.path) == before


def test_sqlite_read_only_url_maps_to_read_only_error(committed: ExpertStore) -> None:
    """A database SQLite itself refuses to write (mode=ro) gives ReadOnlyStoreError, not a raw error."""
    url = f"sqlite:///file:{committed.path / 'store.db'}?mode=ro&uri=true"
    store = ExpertStore.open(committed.path, url=url)
    with pytest.raises(ReadOnlyStoreError, match="cannot be written"):
        store.rollback(1)
    assert store.head() == 2
    store.close()


def _cannot_mount(why: str) -> None:
    """Bind mounts need root in a mount namespace: skip elsewhere, but under CI (where the
    suite runs as root on a machine that allows them) a missing mount is a failure."""
    if os.environ.get("CI"):
        pytest.fail(f"read-only filesystem test could not run under CI: {why}")
    pytest.skip(why)


@pytest.fixture
def read_only_mount(committed: ExpertStore, tmp_path: Path):
    """The store directory bind-mounted read-only: a real EROFS that root cannot bypass."""
    target = tmp_path / "ro"
    target.mkdir()
    mounted = subprocess.run(["mount", "--bind", str(committed.path), str(target)], capture_output=True)
    if mounted.returncode != 0:
        _cannot_mount(f"cannot bind-mount here: {mounted.stderr.decode().strip()}")
    try:
        remount = subprocess.run(["mount", "-o", "remount,bind,ro", str(target)], capture_output=True)
        if remount.returncode != 0:
            _cannot_mount(f"cannot remount read-only: {remount.stderr.decode().strip()}")
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=True)


def test_read_only_filesystem(committed: ExpertStore, read_only_mount: Path) -> None:
    before = snapshot(committed.path)
    store = ExpertStore.open(read_only_mount)
    assert store.read_only and store.head() == 2
    assert store.load_shard(store.version().shards[0])  # reading works
    with pytest.raises(ReadOnlyStoreError):
        store.commit(shards=[new_shard(2, 8)], dense=dense(2), message="x", parent=2)
    with pytest.raises(ReadOnlyStoreError):
        ExpertStore.init(read_only_mount / "sub", {})
    store.close()
    assert snapshot(committed.path) == before


def test_read_only_objects_directory(committed: ExpertStore, tmp_path: Path) -> None:
    """Objects that cannot be written (EROFS from the filesystem) stop the commit before any row."""
    objects = committed.path / "objects"
    mounted = subprocess.run(["mount", "--bind", str(objects), str(objects)], capture_output=True)
    if mounted.returncode != 0:
        _cannot_mount(f"cannot bind-mount here: {mounted.stderr.decode().strip()}")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(objects)], check=True)
        with pytest.raises(ReadOnlyStoreError, match="cannot write object"):
            committed.commit(shards=[new_shard(2, 8)], dense=dense(2), message="x", parent=2)
    finally:
        subprocess.run(["umount", "-l", str(objects)], check=True)
    assert committed.head() == 2 and len(committed.versions()) == 2 and committed.verify() == []


def test_every_error_is_a_store_error() -> None:
    import expert_store

    for name in expert_store.__all__:
        obj = getattr(expert_store, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, StoreError), name
