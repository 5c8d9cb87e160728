"""Commit, load, addressing, history, refs: the store's everyday behaviour."""

from __future__ import annotations

import torch
import pytest

from expert_store import (
    ConflictError,
    ExistingShard,
    ExpertStore,
    InvalidCommitError,
    RefError,
    UnknownShardError,
    UnknownVersionError,
)

from store_testlib import LAYER, dense, new_shard, object_files, tensors


def grow(store: ExpertStore, steps: int) -> list[int]:
    """Commit ``steps`` versions; each freezes the earlier shards and adds 4 new rows."""
    ids: list[int] = []
    for step in range(steps):
        head = store.head()
        old = [ExistingShard(s.id) for s in store.version(head).shards] if head else []
        version = store.commit(
            shards=old + [new_shard(step, 4 * step)], dense=dense(step), message=f"step {step}",
            parent=head, metrics={"loss": 5.0 - step}, cursors={"news": {"offset": step}},
            config={"n1": 4 * (step + 1)}, created_by=f"cycle-{step}",
        )
        ids.append(version.id)
    return ids


def test_round_trip_is_bit_identical(store: ExpertStore) -> None:
    optimizer = {"exp_avg": torch.randn(8, generator=torch.Generator().manual_seed(3))}
    v = store.commit(shards=[new_shard(0, 0, frozen=True)], dense=dense(0), message="first",
                     parent=None, metrics={"loss": 1.25}, cursors={"s": [1, 2]}, optimizer=optimizer)
    reopened = ExpertStore.open(store.path, url=store.url)
    info = reopened.version("HEAD")
    assert (info.id, info.message, info.metrics, info.cursors, info.parent) == (v.id, "first", {"loss": 1.25}, {"s": [1, 2]}, None)
    shard = info.shards[0]
    assert (shard.layer, shard.row_start, shard.row_end, shard.n_experts, shard.frozen, shard.dtype) == (LAYER, 0, 4, 32, True, "float32")
    for name, value in tensors(0).items():
        loaded = reopened.load_shard(shard)[name]
        assert loaded.dtype == value.dtype and torch.equal(loaded, value)
    assert all(torch.equal(reopened.load_dense(v.id)[k], t) for k, t in dense(0).items())
    assert torch.equal(reopened.load_optimizer(v.id)["exp_avg"], optimizer["exp_avg"])
    assert reopened.config == {"d_model": 16}
    reopened.close()


def test_identical_tensors_are_stored_once(store: ExpertStore) -> None:
    a = store.commit(shards=[new_shard(0, 0)], dense=dense(0), message="a", parent=None)
    before = object_files(store)
    b = store.commit(shards=[new_shard(0, 0)], dense=dense(0), message="b", parent=a.id)
    assert object_files(store) == before
    assert a.shards[0].object_hash == b.shards[0].object_hash and a.shards[0].id != b.shards[0].id


def test_existing_shard_writes_nothing_new(store: ExpertStore, monkeypatch: pytest.MonkeyPatch) -> None:
    a = store.commit(shards=[new_shard(0, 0, frozen=True)], dense=dense(0), message="a", parent=None)
    before = object_files(store)
    put_calls: list[object] = []
    real_put = store.objects.put
    monkeypatch.setattr(store.objects, "put", lambda t: put_calls.append(t) or real_put(t))
    monkeypatch.setattr(store.objects, "rehash", lambda h: pytest.fail("ExistingShard must not re-hash"))
    b = store.commit(shards=[ExistingShard(a.shards[0].id)], dense=dense(0), message="b", parent=a.id)
    assert object_files(store) == before
    assert len(put_calls) == 1  # the dense weights only (deduplicated: nothing written)
    assert b.shards[0] == a.shards[0]


def test_log_resolve_tag_rollback_and_roll_forward(store: ExpertStore) -> None:
    ids = grow(store, 4)
    assert [v.id for v in store.log()] == ids[::-1]
    assert [v.id for v in store.log("HEAD", limit=2)] == ids[:1:-1]
    assert store.resolve("HEAD") == ids[3]
    assert store.resolve("HEAD~2") == store.resolve("HEAD^^") == ids[1]
    assert store.resolve(str(ids[0])) == store.resolve(f"v{ids[0]}") == store.resolve(ids[0]) == ids[0]
    store.tag("good", "HEAD~1")
    assert store.resolve("good") == ids[2] and store.resolve("good~1") == ids[1]
    assert store.rollback("good", why="bad metrics") == ids[2]
    assert store.resolve("HEAD") == ids[2]
    assert len(store.versions()) == 4  # nothing deleted
    assert store.rollback(ids[3], why="roll forward") == ids[3]
    for shard in store.version("HEAD").shards:
        store.load_shard(shard)
    moves = [(e.ref, e.old, e.new, e.why) for e in store.reflog("HEAD")[:2]]
    assert moves == [("HEAD", ids[2], ids[3], "roll forward"), ("HEAD", ids[3], ids[2], "bad metrics")]
    assert [e.ref for e in store.reflog()].count("good") == 1
    assert {(r.name, r.kind) for r in store.refs()} == {("HEAD", "ref"), ("good", "tag")}


def test_diff_reports_shards_experts_and_metrics(store: ExpertStore) -> None:
    ids = grow(store, 3)
    diff = store.diff(ids[0], ids[2])
    layer = diff.layers[LAYER]
    assert [s.row_start for s in layer.added] == [4, 8] and layer.removed == []
    assert layer.experts_added == 64 and layer.rows_added == 8
    assert diff.metrics == {"loss": (5.0, 3.0)} and diff.dense_changed
    assert len(diff.shared_shards) == 1
    back = store.diff(ids[2], ids[0]).layers[LAYER]
    assert back.experts_removed == 64 and back.added == []
    assert store.diff(ids[1], ids[1]).empty
    assert "+2 shard(s)" in diff.summary()


def test_refs_compare_and_swap(store: ExpertStore) -> None:
    ids = grow(store, 2)
    store.set_ref("candidate", ids[1], expected_old=None, why="candidate of cycle 2")
    with pytest.raises(ConflictError, match="already points at version"):
        store.set_ref("candidate", ids[0], expected_old=None)
    with pytest.raises(ConflictError, match="expected version"):
        store.set_ref("candidate", ids[0], expected_old=ids[0])
    assert store.set_ref("candidate", ids[0], expected_old=ids[1]) == ids[0]
    store.tag("release", ids[1])
    with pytest.raises(RefError, match="tag"):
        store.set_ref("release", ids[0], expected_old=ids[1])
    with pytest.raises(RefError, match="already exists"):
        store.tag("release", ids[0])
    with pytest.raises(RefError, match="version id"):
        store.tag("v3", ids[0])


def test_commit_on_stale_parent_conflicts_and_changes_nothing(store: ExpertStore) -> None:
    ids = grow(store, 2)
    versions, refs = store.versions(), store.refs()
    with pytest.raises(ConflictError):
        store.commit(shards=[new_shard(9, 100)], dense=dense(9), message="stale", parent=ids[0])
    assert store.versions() == versions and store.refs() == refs
    assert store.verify() == []


def test_commit_without_ref_moves_nothing(store: ExpertStore) -> None:
    ids = grow(store, 1)
    v = store.commit(shards=[new_shard(5, 0)], dense=dense(5), message="side", parent=ids[0], ref=None)
    assert store.head() == ids[0] and store.version(v.id).parent == ids[0]


def test_invalid_commits_are_refused_before_anything_changes(store: ExpertStore) -> None:
    ids = grow(store, 1)
    shard_id = store.version(ids[0]).shards[0].id
    versions = store.versions()
    with pytest.raises(InvalidCommitError, match="overlap"):
        store.commit(shards=[ExistingShard(shard_id), new_shard(1, 2)], dense=dense(1), message="x", parent=ids[0])
    with pytest.raises(InvalidCommitError, match="row range"):
        store.commit(shards=[new_shard(1, 8, rows=0)], dense=dense(1), message="x", parent=ids[0])
    with pytest.raises(InvalidCommitError, match="JSON"):
        store.commit(shards=[], dense=dense(1), message="x", parent=ids[0], metrics={"bad": object()})
    with pytest.raises(InvalidCommitError, match="dense weights are empty"):
        store.commit(shards=[], dense={}, message="x", parent=ids[0])
    with pytest.raises(InvalidCommitError, match="NewShard, ExistingShard or DeltaShard"):
        store.commit(shards=[shard_id], dense=dense(1), message="x", parent=ids[0])
    with pytest.raises(UnknownShardError):
        store.commit(shards=[ExistingShard(999)], dense=dense(1), message="x", parent=ids[0])
    with pytest.raises(UnknownVersionError):
        store.commit(shards=[], dense=dense(1), message="x", parent=999)
    assert store.versions() == versions and store.head() == ids[0]
