"""A store written by the previous release (schema 1, no delta columns) keeps working."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import torch

from expert_store import SCHEMA_VERSION, DeltaShard, ExistingShard, ExpertStore, Residency

from store_testlib import dense, new_shard, tensors
from test_errors import snapshot

# The shards table exactly as schema 1 created it (SQLAlchemy's DDL for SQLite).
V1_SHARDS = (
    "CREATE TABLE shards (\n\tid INTEGER NOT NULL, \n\tobject_hash VARCHAR(64) NOT NULL, \n\t"
    "layer VARCHAR(255) NOT NULL, \n\trow_start INTEGER NOT NULL, \n\trow_end INTEGER NOT NULL, \n\t"
    "n_experts BIGINT NOT NULL, \n\tdtype VARCHAR(64) NOT NULL, \n\tbytes BIGINT NOT NULL, \n\t"
    "frozen BOOLEAN NOT NULL, \n\tcreated_by VARCHAR(255), \n\tcreated_at DATETIME NOT NULL, \n\t"
    "PRIMARY KEY (id)\n)"
)
V1_COLUMNS = "id, object_hash, layer, row_start, row_end, n_experts, dtype, bytes, frozen, created_by, created_at"


def make_v1_store(path: Path) -> tuple[int, int]:
    """A store with two versions whose database is the one schema 1 would have written."""
    store = ExpertStore.init(path, {"d_model": 16})
    v1 = store.commit(shards=[new_shard(0, 0, frozen=True)], dense=dense(0), message="v1", parent=None)
    v2 = store.commit(shards=[ExistingShard(v1.shards[0].id), new_shard(1, 4)], dense=dense(1), message="v2", parent=v1.id)
    store.close()
    db = sqlite3.connect(path / "store.db")
    db.execute("PRAGMA foreign_keys = OFF")
    with db:  # SQLite's table rebuild: new table, copy, drop, rename
        db.execute(V1_SHARDS.replace("CREATE TABLE shards", "CREATE TABLE shards_v1"))
        db.execute(f"INSERT INTO shards_v1 ({V1_COLUMNS}) SELECT {V1_COLUMNS} FROM shards")
        db.execute("DROP TABLE shards")
        db.execute("ALTER TABLE shards_v1 RENAME TO shards")
        db.execute("CREATE INDEX ix_shards_layer ON shards (layer)")
        db.execute("CREATE INDEX ix_shards_object_hash ON shards (object_hash)")
        db.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    sql = db.execute("SELECT sql FROM sqlite_master WHERE name = 'shards'").fetchone()[0]
    db.close()
    assert sql == V1_SHARDS.replace("CREATE TABLE shards", 'CREATE TABLE "shards"') or sql == V1_SHARDS
    return v1.id, v2.id


def schema_of(path: Path) -> tuple[str, set[str]]:
    db = sqlite3.connect(path / "store.db")
    version = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0]
    columns = {row[1] for row in db.execute("PRAGMA table_info(shards)")}
    db.close()
    return version, columns


@pytest.fixture
def old(tmp_path: Path) -> tuple[Path, int, int]:
    path = tmp_path / "old"
    return (path, *make_v1_store(path))


def test_old_store_opens_read_only_without_changing_it(old) -> None:
    path, v1, v2 = old
    before = snapshot(path)
    store = ExpertStore.open(path, read_only=True)
    info = store.version("HEAD")
    assert info.id == v2 and [(s.base_id, s.depth, s.object_bytes == s.bytes) for s in info.shards] == [(None, 0, True)] * 2
    assert torch.equal(store.load_shard(info.shards[1])["u"], tensors(1)["u"])
    assert store.verify() == [] and [v.id for v in store.log()] == [v2, v1]
    store.close()
    assert snapshot(path) == before and schema_of(path)[0] == "1"


def test_old_store_is_upgraded_on_open_and_commits_deltas_and_rolls_back(old) -> None:
    path, v1, v2 = old
    store = ExpertStore.open(path)
    version, columns = schema_of(path)
    assert version == str(SCHEMA_VERSION) and {"base_id", "depth", "object_bytes"} <= columns
    old_shards = store.version(v2).shards
    assert [(s.base_id, s.depth, s.object_bytes) for s in old_shards] == [(None, 0, s.bytes) for s in old_shards]
    assert torch.equal(store.load_shard(old_shards[0])["v"], tensors(0)["v"])

    ids, rows = torch.tensor([1, 7]), torch.randn(2, 16)
    v3 = store.commit(shards=[DeltaShard(old_shards[0].id, {"u": (ids, rows)}), ExistingShard(old_shards[1].id)],
                      dense=dense(3), message="sparse on an old shard", parent=v2)
    want = tensors(0)
    want["u"][ids] = rows
    assert v3.shards[0].base_id == old_shards[0].id
    assert torch.equal(Residency(store).checkout(v3.id).layers[v3.shards[0].layer][0][1]["u"], want["u"])
    assert store.rollback(v1) == v1 and store.version().id == v1
    assert store.rollback(v3.id) == v3.id and store.verify() == []
    store.close()
    again = ExpertStore.open(path)  # already upgraded: opens as is
    assert torch.equal(again.load_shard(v3.shards[0])["u"], want["u"])
    again.close()


def test_an_interrupted_upgrade_runs_again(old) -> None:
    """A database without transactional DDL may keep a column of a failed upgrade."""
    path, _, v2 = old
    db = sqlite3.connect(path / "store.db")
    with db:
        db.execute("ALTER TABLE shards ADD COLUMN base_id INTEGER")
    db.close()
    store = ExpertStore.open(path)
    assert schema_of(path)[0] == str(SCHEMA_VERSION) and store.version().id == v2 and store.verify() == []
    store.close()


def test_old_store_in_a_database_sqlite_cannot_write_is_read(old) -> None:
    path, _, v2 = old
    before = snapshot(path)
    store = ExpertStore.open(path, url=f"sqlite:///file:{path / 'store.db'}?mode=ro&uri=true")
    assert store.read_only and store.version().id == v2 and store.load_shard(store.version().shards[0])
    store.close()
    assert snapshot(path) == before
