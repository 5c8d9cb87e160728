"""Delta shards: bit-identical chains, compaction, invalid deltas, verify, gc, residency."""

from __future__ import annotations

import sqlite3

import pytest
import torch

from expert_store import (
    MAX_DELTA_CHAIN,
    ConflictError,
    CorruptObjectError,
    DeltaShard,
    ExistingShard,
    ExpertStore,
    InvalidCommitError,
    NewShard,
    Residency,
    UnknownShardError,
)

from store_testlib import LAYER, dense, new_shard, object_files, tensors
from test_corruption import flip_byte

Tensors = dict[str, torch.Tensor]


def same_bits(a: Tensors, b: Tensors) -> bool:
    """Equal names, dtypes, shapes and bytes (NaN and -0.0 included)."""
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        and torch.equal(a[k].contiguous().view(torch.uint8), b[k].contiguous().view(torch.uint8))
        for k in a
    )


def sparse_update(base: Tensors, seed: int, names: tuple[str, ...] = ("u", "v", "row_keys")) -> tuple[dict, Tensors]:
    """(DeltaShard rows, the full tensors after them): a few random rows of each tensor."""
    gen = torch.Generator().manual_seed(seed)
    rows, after = {}, {k: t.clone() for k, t in base.items()}
    for name in names:
        t = base[name]
        ids = torch.randperm(t.shape[0], generator=gen)[: max(1, t.shape[0] // 8)]
        values = torch.randn((len(ids), *t.shape[1:]), generator=gen).to(t.dtype)
        values.view(-1)[:2] = torch.tensor([float("nan"), -0.0], dtype=t.dtype)  # exact bits survive
        rows[name] = (ids, values)
        after[name][ids] = values
    return rows, after


def record_reads(store: ExpertStore, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The hashes of the objects loaded from now on, in order."""
    reads: list[str] = []
    real_load = store.objects.load
    monkeypatch.setattr(store.objects, "load", lambda h, *a, **kw: reads.append(h) or real_load(h, *a, **kw))
    return reads


def commit_delta(store: ExpertStore, base_id: int, rows: dict, message: str = "sparse", frozen: bool = False):
    return store.commit(shards=[DeltaShard(base_id, rows, frozen=frozen)], dense=dense(0), message=message,
                        parent=store.head())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chains_of_deltas_check_out_bit_identical(store: ExpertStore, dtype: torch.dtype) -> None:
    full = {k: t.to(dtype) for k, t in tensors(0).items()}
    v1 = store.commit(shards=[NewShard(LAYER, 0, 4, 32, full, frozen=True)], dense=dense(0), message="v1", parent=None)
    expected = {v1.id: full}
    shard = v1.shards[0]
    for k in range(1, MAX_DELTA_CHAIN + 1):
        rows, after = sparse_update(expected[store.head()], seed=k, names=("u", "row_keys") if k % 2 else ("v",))
        v = commit_delta(store, shard.id, rows, frozen=k % 2 == 0)
        new = v.shards[0]
        assert (new.base_id, new.depth, new.frozen) == (shard.id, k, k % 2 == 0)
        assert (new.layer, new.row_start, new.row_end, new.n_experts, new.dtype, new.bytes) == (
            shard.layer, shard.row_start, shard.row_end, shard.n_experts, shard.dtype, shard.bytes)
        assert 0 < new.object_bytes < new.bytes and v.shard_bytes == shard.bytes
        assert [s.id for s in store.shard_chain(new)] == [s.id for s in store.shard_chain(shard)] + [new.id]
        expected[v.id] = after
        shard = new
    reopened = ExpertStore.open(store.path, url=store.url)
    for version_id, want in expected.items():
        assert same_bits(reopened.load_shard(reopened.version(version_id).shards[0]), want)
    assert reopened.verify() == []
    reopened.close()


def test_chain_is_compacted_past_the_limit(store: ExpertStore) -> None:
    v = store.commit(shards=[new_shard(0, 0)], dense=dense(0), message="v1", parent=None)
    want = tensors(0)
    for k in range(1, MAX_DELTA_CHAIN + 3):
        rows, want = sparse_update(want, seed=k)
        v = commit_delta(store, v.shards[0].id, rows)
        shard = v.shards[0]
        if k <= MAX_DELTA_CHAIN:
            assert shard.depth == k and shard.base_id is not None
        elif k == MAX_DELTA_CHAIN + 1:  # would be one delta too many: written in full
            assert (shard.base_id, shard.depth, shard.object_bytes) == (None, 0, shard.bytes)
            assert store.shard_chain(shard) == [shard]
            compacted = shard.id
        else:  # and the next delta starts a new chain on it
            assert (shard.base_id, shard.depth) == (compacted, 1)
        assert same_bits(store.load_shard(shard), want)
    assert store.verify() == []


def test_compaction_limit_is_read_at_commit_time(store: ExpertStore, monkeypatch: pytest.MonkeyPatch) -> None:
    import expert_store.delta

    monkeypatch.setattr(expert_store.delta, "MAX_DELTA_CHAIN", 1)
    v = store.commit(shards=[new_shard(0, 0)], dense=dense(0), message="v1", parent=None)
    want = tensors(0)
    depths = []
    for seed in (1, 2, 3):
        rows, want = sparse_update(want, seed=seed)
        v = commit_delta(store, v.shards[0].id, rows)
        depths.append(v.shards[0].depth)
        assert same_bits(store.load_shard(v.shards[0]), want)
    assert depths == [1, 0, 1]


def test_invalid_deltas_are_refused_naming_shard_and_tensor(store: ExpertStore) -> None:
    v1 = store.commit(shards=[new_shard(0, 0)], dense=dense(0), message="v1", parent=None)
    sid = v1.shards[0].id
    before, versions = object_files(store), store.versions()
    good = torch.randn(2, 16)
    cases = {
        "not in the base shard": {"w": (torch.tensor([0, 1]), good)},
        r"must lie in \[0, 32\), got 0..32": {"u": (torch.tensor([0, 32]), good)},
        r"\[0, 32\), got -1..1": {"u": (torch.tensor([-1, 1]), good)},
        "repeat": {"u": (torch.tensor([3, 3]), good)},
        "must be float32 of shape": {"u": (torch.tensor([0, 1]), good.double())},
        r"of shape \(2, 16\)": {"v": (torch.tensor([0, 1]), torch.randn(2, 15))},
        "1-D int64": {"u": (torch.tensor([0, 1], dtype=torch.int32), good)},
        "1-D int64 tensor, got torch.int64 of shape": {"u": (torch.tensor([[0, 1]]), good)},
    }
    for match, rows in cases.items():
        with pytest.raises(InvalidCommitError, match=match) as info:
            store.commit(shards=[new_shard(5, 4), DeltaShard(sid, rows)], dense=dense(9), message="x", parent=v1.id)
        assert f"delta on shard {sid}" in str(info.value) and repr(next(iter(rows))) in str(info.value)
    with pytest.raises(InvalidCommitError, match="expected \\(ids, rows\\)"):
        store.commit(shards=[DeltaShard(sid, {"u": torch.zeros(2)})], dense=dense(9), message="x", parent=v1.id)
    with pytest.raises(UnknownShardError, match="shard 99 does not exist"):
        store.commit(shards=[DeltaShard(99, {})], dense=dense(9), message="x", parent=v1.id)
    assert object_files(store) == before and store.versions() == versions  # nothing written


def test_delta_overlapping_its_base_in_one_version_is_refused(store: ExpertStore) -> None:
    v1 = store.commit(shards=[new_shard(0, 0)], dense=dense(0), message="v1", parent=None)
    rows, _ = sparse_update(tensors(0), seed=1)
    with pytest.raises(InvalidCommitError, match="overlap"):
        store.commit(shards=[ExistingShard(v1.shards[0].id), DeltaShard(v1.shards[0].id, rows)],
                     dense=dense(0), message="x", parent=v1.id)


@pytest.fixture
def chain(store: ExpertStore):
    """v1: full shard + another; v2: a delta on it; v3: a delta on that."""
    v1 = store.commit(shards=[new_shard(0, 0), new_shard(1, 4)], dense=dense(0), message="v1", parent=None)
    other = ExistingShard(v1.shards[1].id)
    r2, _ = sparse_update(tensors(0), seed=2)
    v2 = store.commit(shards=[DeltaShard(v1.shards[0].id, r2), other], dense=dense(0), message="v2", parent=v1.id)
    r3, _ = sparse_update(tensors(0), seed=3)
    v3 = store.commit(shards=[DeltaShard(v2.shards[0].id, r3), other], dense=dense(0), message="v3", parent=v2.id)
    return v1, v2, v3


@pytest.mark.parametrize("bad", [0, 1], ids=["base", "first-delta"])
def test_verify_and_load_name_a_corrupt_chain_member(store: ExpertStore, chain, bad: int) -> None:
    members = [v.shards[0] for v in chain]  # base, delta on it, delta on that
    broken = members[bad]
    flip_byte(store.objects.path(broken.object_hash))
    needed_by = tuple(v.id for v in chain[bad:])
    problems = store.verify()
    assert [(p.kind, p.hash, p.shard_ids, p.version_ids) for p in problems] == [
        ("corrupt-object", broken.object_hash, tuple(m.id for m in members[bad:]), needed_by)]
    last = members[-1]
    with pytest.raises(CorruptObjectError) as info:
        store.load_shard(last.id)
    err = info.value
    assert (err.shard_id, err.version_ids, err.hash) == (last.id, needed_by, broken.object_hash)
    assert f"shard {last.id}" in str(err) and f"through shard {broken.id}" in str(err)
    if bad:  # the versions before the broken delta still load, and HEAD can go back to them
        assert store.load_shard(members[0].id) and store.rollback(chain[0].id) == chain[0].id


@pytest.mark.sqlite_only
def test_verify_reports_a_delta_that_does_not_apply(store: ExpertStore, chain) -> None:
    _, v2, v3 = chain
    d1 = v2.shards[0]
    bogus = store.objects.put({"u.ids": torch.tensor([40]), "u.rows": torch.zeros(1, 16)})
    db = sqlite3.connect(store.path / "store.db")
    with db:
        db.execute("UPDATE shards SET object_hash = ? WHERE id = ?", (bogus.hash, d1.id))
    db.close()
    [problem] = store.verify()
    assert problem.kind == "bad-delta" and "must lie in [0, 32), got 40..40" in problem.detail
    assert (problem.hash, problem.shard_ids, problem.version_ids) == (bogus.hash, (d1.id, v3.shards[0].id), (v2.id, v3.id))
    with pytest.raises(CorruptObjectError, match="does not apply"):
        store.load_shard(v3.shards[0])


@pytest.mark.sqlite_only
def test_verify_reports_a_delta_row_with_a_missing_base(store: ExpertStore, chain) -> None:
    _, v2, _ = chain
    db = sqlite3.connect(store.path / "store.db")  # foreign keys are off in a bare connection
    with db:
        db.execute("UPDATE shards SET base_id = 77 WHERE id = ?", (v2.shards[0].id,))
    db.close()
    assert [(p.kind, p.detail) for p in store.verify()] == [
        ("bad-row", f"delta shard {v2.shards[0].id} has missing base shard 77")]
    with pytest.raises(UnknownShardError, match="missing base shard 77"):
        store.load_shard(v2.shards[0].id)


def test_gc_keeps_every_object_of_a_chain(store: ExpertStore, chain) -> None:
    v1, _, v3 = chain
    store.rollback(v1.id)
    rows, _ = sparse_update(tensors(0), seed=9)
    with pytest.raises(ConflictError):  # a lost race leaves its delta object unreachable
        store.commit(shards=[DeltaShard(v3.shards[0].id, rows)], dense=dense(0), message="late", parent=v3.id)
    needed = {s.object_hash for v in chain for s in v.shards} | {v1.dense_hash}
    result = store.gc(grace_s=0)
    assert len(result.objects) == 1 and result.objects[0] not in needed
    assert needed <= object_files(store) and store.verify() == []
    assert store.load_shard(v3.shards[0])


def test_residency_applies_deltas_on_a_resident_base(store: ExpertStore, chain, monkeypatch: pytest.MonkeyPatch) -> None:
    v1, v2, v3 = chain
    residency = Residency(store, "cpu", reuse_bases=True)  # the default off the CPU
    residency.checkout(v1.id)
    base_u = residency.tensors(v1.shards[0].id)["u"]
    base_copy = base_u.clone()
    reads = record_reads(store, monkeypatch)
    result = residency.checkout(v3.id)
    assert result.loaded == [v3.shards[0].id] and result.reused == [v1.shards[1].id]
    assert result.evicted == [v1.shards[0].id]
    assert reads == [v2.shards[0].object_hash, v3.shards[0].object_hash]  # the base was not read again
    assert torch.equal(base_u, base_copy)  # the resident base was copied, not written
    fresh = store.load_shard(v3.shards[0])
    assert same_bits(result.layers[LAYER][0][1], fresh)
    assert residency.resident_bytes() == v3.shard_bytes == v1.shard_bytes
    cold = Residency(store, "cpu").checkout(v2.id)  # nothing resident: base and delta read
    assert same_bits(cold.layers[LAYER][0][1], store.load_shard(v2.shards[0]))


def test_residency_on_the_cpu_reads_the_base_by_default(store: ExpertStore, chain, monkeypatch: pytest.MonkeyPatch) -> None:
    v1, v2, _ = chain
    residency = Residency(store, "cpu")
    assert not residency.reuse_bases and Residency(store, "cuda:0").reuse_bases
    residency.checkout(v1.id)
    reads = record_reads(store, monkeypatch)
    result = residency.checkout(v2.id)
    assert reads == [v1.shards[0].object_hash, v2.shards[0].object_hash]
    assert same_bits(result.layers[LAYER][0][1], store.load_shard(v2.shards[0]))


def test_diff_reports_a_delta_as_a_changed_shard(store: ExpertStore, chain) -> None:
    v1, v2, _ = chain
    layer = store.diff(v1.id, v2.id).layers[LAYER]
    assert [(a.id, b.id) for a, b in layer.changed] == [(v1.shards[0].id, v2.shards[0].id)]
    assert layer.added == [] and layer.removed == [] and layer.experts_added == 0
