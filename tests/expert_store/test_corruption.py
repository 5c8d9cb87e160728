"""A flipped byte in an object is found by verify and by loading, and rollback recovers."""

from __future__ import annotations

import os

import pytest

from expert_store import CorruptObjectError, ExistingShard, ExpertStore, MissingObjectError

from store_testlib import dense, new_shard


def flip_byte(path: os.PathLike[str], offset: int = -5) -> None:
    os.chmod(path, 0o644)
    data = bytearray(open(path, "rb").read())
    data[offset] ^= 0x01
    open(path, "wb").write(bytes(data))


def test_corrupt_object_is_reported_and_rollback_recovers(store: ExpertStore) -> None:
    v1 = store.commit(shards=[new_shard(0, 0, frozen=True)], dense=dense(0), message="v1", parent=None)
    v2 = store.commit(shards=[ExistingShard(v1.shards[0].id), new_shard(1, 4)], dense=dense(1), message="v2", parent=v1.id)
    bad = v2.shards[1]
    flip_byte(store.objects.path(bad.object_hash))

    problems = store.verify()
    assert [(p.kind, p.hash, p.shard_ids, p.version_ids) for p in problems] == [
        ("corrupt-object", bad.object_hash, (bad.id,), (v2.id,))
    ]
    with pytest.raises(CorruptObjectError) as info:
        store.load_shard(bad.id)
    message = str(info.value)
    assert f"shard {bad.id}" in message and f"version(s) {v2.id}" in message and bad.object_hash in message
    assert info.value.shard_id == bad.id and info.value.version_ids == (v2.id,)
    # Loading without verification still refuses bytes it cannot make sense of only when
    # the header breaks; the hash check is what catches a flipped data byte.
    assert store.load_shard(bad.id, verify=False)

    store.rollback(v1.id, why="v2 has a corrupt shard")
    head = store.version("HEAD")
    assert head.id == v1.id
    for shard in head.shards:
        assert store.load_shard(shard)
    assert store.load_dense("HEAD")


def test_corrupt_dense_and_missing_object(store: ExpertStore) -> None:
    v1 = store.commit(shards=[new_shard(0, 0)], dense=dense(0), message="v1", parent=None)
    flip_byte(store.objects.path(v1.dense_hash), offset=3)  # header length: unparseable
    with pytest.raises(CorruptObjectError, match=f"dense weights of version {v1.id}"):
        store.load_dense(v1.id)
    with pytest.raises(CorruptObjectError, match="cannot be parsed"):
        store.load_dense(v1.id, verify=False)
    os.remove(store.objects.path(v1.shards[0].object_hash))
    with pytest.raises(MissingObjectError, match="missing"):
        store.load_shard(v1.shards[0].id)
    assert {p.kind for p in store.verify()} == {"corrupt-object", "missing-object"}


def test_gc_keeps_reachable_and_removes_unreachable(store: ExpertStore) -> None:
    v1 = store.commit(shards=[new_shard(0, 0)], dense=dense(0), message="v1", parent=None)
    orphan = store.objects.put(new_shard(7, 0).tensors)
    temp = store.objects.path(v1.dense_hash).parent / ".x.tmp-1-dead"
    temp.write_bytes(b"half")
    assert store.gc(grace_s=3600).objects == []  # too young: a commit could be in flight
    dry = store.gc(dry_run=True, grace_s=0)
    assert dry.objects == [orphan.hash] and dry.temp_files == [temp] and store.objects.exists(orphan.hash)
    done = store.gc(grace_s=0)
    assert done.objects == [orphan.hash] and not store.objects.exists(orphan.hash) and not temp.exists()
    assert store.verify() == [] and store.load_shard(v1.shards[0].id)
