"""gc removes only what no row references and only past the grace period; verify reports
missing objects and rows that point nowhere (beyond test_corruption's flipped bytes)."""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

import pytest
import torch

from expert_store import ExistingShard, ExpertStore

from store_testlib import dense, new_shard


def age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_gc_spares_reachable_and_young_files(store: ExpertStore) -> None:
    v1 = store.commit(shards=[new_shard(0, 0)], dense=dense(0), message="v1", parent=None,
                      optimizer={"m": torch.zeros(3)})
    store.commit(shards=[ExistingShard(v1.shards[0].id)], dense=dense(1), message="v2", parent=v1.id)
    reachable = set(store.objects.hashes())
    old, young = store.objects.put(new_shard(7, 0).tensors), store.objects.put(new_shard(8, 0).tensors)
    fanout = store.objects.path(old.hash).parent
    old_tmp, young_tmp = fanout / ".a.tmp-1-dead", fanout / ".b.tmp-2-live"
    old_tmp.write_bytes(b"12345")
    young_tmp.write_bytes(b"1")
    for path in [store.objects.path(h) for h in reachable | {old.hash}] + [old_tmp]:
        age(path, 3600)  # only reachability protects the referenced objects now
    freed = store.objects.path(old.hash).stat().st_size + 5

    result = store.gc(grace_s=600)
    assert (result.objects, result.temp_files, result.bytes) == ([old.hash], [old_tmp], freed)
    assert set(store.objects.hashes()) == reachable | {young.hash}
    assert not old_tmp.exists() and young_tmp.exists()
    assert store.verify() == [] and store.load_optimizer(v1.id)["m"].shape == (3,)
    assert store.gc(grace_s=0).objects == [young.hash]


def test_verify_reports_missing_objects_with_their_users(store: ExpertStore) -> None:
    v1 = store.commit(shards=[new_shard(0, 0)], dense=dense(0), message="v1", parent=None,
                      optimizer={"m": torch.zeros(3)})
    v2 = store.commit(shards=[ExistingShard(v1.shards[0].id)], dense=dense(1), message="v2", parent=v1.id)
    os.remove(store.objects.path(v1.optimizer_hash))
    os.remove(store.objects.path(v1.shards[0].object_hash))
    problems = {p.hash: p for p in store.verify()}
    assert set(problems) == {v1.optimizer_hash, v1.shards[0].object_hash}
    opt, shard = problems[v1.optimizer_hash], problems[v1.shards[0].object_hash]
    assert (opt.kind, opt.shard_ids, opt.version_ids) == ("missing-object", (), (v1.id,))
    assert (shard.kind, shard.shard_ids, shard.version_ids) == ("missing-object", (v1.shards[0].id,), (v1.id, v2.id))
    assert f"versions: {v1.id}, {v2.id}" in shard.detail


@pytest.mark.sqlite_only
def test_verify_reports_rows_that_point_nowhere(store: ExpertStore) -> None:
    v1 = store.commit(shards=[new_shard(0, 0)], dense=dense(0), message="v1", parent=None)
    v2 = store.commit(shards=[new_shard(1, 4)], dense=dense(1), message="v2", parent=v1.id)
    db = sqlite3.connect(store.path / "store.db")  # foreign keys are off in a bare connection
    with db:
        db.execute("UPDATE refs SET version_id = 99 WHERE name = 'HEAD'")
        db.execute("UPDATE versions SET parent_id = 77 WHERE id = ?", (v2.id,))
        db.execute("INSERT INTO version_shards (version_id, position, shard_id) VALUES (?, 5, 555)", (v1.id,))
        db.execute("UPDATE shards SET row_end = row_start WHERE id = ?", (v1.shards[0].id,))
    db.close()
    got = sorted((p.kind, p.detail) for p in store.verify())
    assert got == sorted([
        ("bad-row", "ref 'HEAD' points at missing version 99"),
        ("bad-row", f"version {v2.id} has missing parent 77"),
        ("bad-row", f"version {v1.id} lists missing shard 555"),
        ("bad-row", f"shard {v1.shards[0].id} has empty row range"),
    ])
