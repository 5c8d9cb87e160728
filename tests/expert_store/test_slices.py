"""Sliced shards: parts written apart (as by the ranks of an expert-parallel run), committed
as one shard, read back whole or as any column slice, bit for bit; verify and gc know them."""

from __future__ import annotations

import os
import sqlite3

import pytest
import torch

from expert_store import (Columns, CorruptObjectError, DeltaShard, ExistingShard, ExpertStore, InvalidCommitError, NewShard,
                          Residency, SlicedShard)

from store_testlib import LAYER, dense, tensors
from test_corruption import flip_byte

WHOLE = ("u", "v")


def sliced(store: ExpertStore, seed: int, start: int, bounds: tuple[int, ...] = (0, 8, 16), rows: int = 4) -> SlicedShard:
    """Shard ``tensors(seed)`` written as one part per column range of ``bounds`` (one per rank)."""
    t = tensors(seed, rows)
    parts = [store.write_part(a, b, {n: t[n][:, a:b] for n in WHOLE}) for a, b in zip(bounds, bounds[1:])]
    return SlicedShard(LAYER, start, start + rows, rows * 8, {"row_keys": t["row_keys"]}, parts)


@pytest.fixture
def two(store: ExpertStore):
    """v1: a full shard (rows 0..4) and a shard sliced in 2 (rows 4..8)."""
    v1 = store.commit(shards=[NewShard(LAYER, 0, 4, 32, tensors(0)), sliced(store, 1, 4)], dense=dense(0), message="v1",
                      parent=None)
    return store, v1


def test_a_sliced_shard_reads_back_whole_and_as_any_columns(two) -> None:
    store, v1 = two
    full, cut = v1.shards
    assert cut.is_sliced and not full.is_sliced and [(p.col_start, p.col_end) for p in cut.parts] == [(0, 8), (8, 16)]
    assert cut.bytes == full.bytes == cut.object_bytes and cut.dtype == "float32"
    want = tensors(1)
    got = store.load_shard(cut)
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)
    for lo, hi in [(0, 8), (8, 16), (0, 4), (4, 12), (12, 16), (3, 3)]:  # 1 rank, 2 ranks, 4 ranks, across parts, none
        for info, t in ((cut, want), (full, tensors(0))):
            got = store.load_shard(info, columns=Columns(lo, hi, WHOLE))
            assert torch.equal(got["row_keys"], t["row_keys"])
            assert all(torch.equal(got[n], t[n][:, lo:hi]) for n in WHOLE), (info.id, lo, hi)
    loaded = Residency(store).checkout(v1.id).layers[LAYER]
    assert torch.equal(loaded[1][1]["v"], want["v"])


def test_only_the_parts_holding_the_columns_are_read(two) -> None:
    store, v1 = two
    cut = v1.shards[1]
    os.remove(store.objects.path(cut.parts[1].object_hash))  # columns 8..16 are gone
    assert torch.equal(store.load_shard(cut, columns=Columns(0, 8, WHOLE))["u"], tensors(1)["u"][:, :8])
    with pytest.raises(CorruptObjectError, match=f"shard {cut.id} .* needed by version"):
        store.load_shard(cut, columns=Columns(4, 12, WHOLE))


def test_deltas_on_a_sliced_shard_and_the_diff(two) -> None:
    store, v1 = two
    ids, rows = torch.tensor([2, 30]), torch.randn(2, 16)
    v2 = store.commit(shards=[ExistingShard(v1.shards[0].id), DeltaShard(v1.shards[1].id, {"v": (ids, rows)})],
                      dense=dense(1), message="v2", parent=v1.id)
    want = tensors(1)
    want["v"][ids] = rows
    assert torch.equal(store.load_shard(v2.shards[1])["v"], want["v"])
    assert torch.equal(store.load_shard(v2.shards[1], columns=Columns(8, 16, WHOLE))["v"], want["v"][:, 8:])
    assert store.verify() == []
    assert "~1 changed (0 as deltas, 1 sliced)" in store.diff(v2.id, v1.id).summary()


def test_commit_refuses_parts_that_do_not_fit_and_writes_nothing(store: ExpertStore) -> None:
    good = sliced(store, 1, 0)
    before = set(store.objects.hashes())
    short = store.write_part(8, 16, {n: tensors(1, rows=2)[n][:, 8:] for n in WHOLE})  # 16 rows, not 32
    cases = [
        (SlicedShard(LAYER, 0, 4, 32, {}, good.parts[1:]), "part 0 holds columns \\[8, 16\\) where column 0 comes next"),
        (SlicedShard(LAYER, 0, 4, 32, {}, [good.parts[0], short]), "tensor 'u' of part 1 is float32 \\(16, 8\\)"),
        (SlicedShard(LAYER, 0, 4, 32, {"u": torch.zeros(1)}, good.parts), "both whole and in parts"),
    ]
    for shard, message in cases:
        with pytest.raises(InvalidCommitError, match=message):
            store.commit(shards=[shard], dense=dense(0), message="bad", parent=None)
    os.remove(store.objects.path(good.parts[1].object_hash))
    with pytest.raises(InvalidCommitError, match="is missing"):
        store.commit(shards=[good], dense=dense(0), message="bad", parent=None)
    with pytest.raises(InvalidCommitError, match="must have 8 columns"):
        store.write_part(0, 8, {"u": torch.zeros(4, 7)})
    assert store.versions() == [] and set(store.objects.hashes()) <= before | {short.object_hash}


def test_verify_rehashes_parts_and_gc_keeps_them(two) -> None:
    store, v1 = two
    cut = v1.shards[1]
    stray = store.write_part(0, 8, {"u": torch.ones(32, 8)})  # written by a rank whose commit never came
    assert set(store.gc(grace_s=0).objects) == {stray.object_hash}  # the parts a row names stay
    assert all(store.objects.exists(p.object_hash) for p in cut.parts) and store.verify() == []
    flip_byte(store.objects.path(cut.parts[1].object_hash))
    (problem,) = store.verify()
    assert (problem.kind, problem.hash, problem.shard_ids, problem.version_ids) == (
        "corrupt-object", cut.parts[1].object_hash, (cut.id,), (v1.id,))
    with pytest.raises(CorruptObjectError, match="is corrupt"):
        store.load_shard(cut)
    assert store.load_shard(cut, columns=Columns(0, 8, WHOLE))  # the other rank's columns are fine


@pytest.mark.sqlite_only
def test_verify_reports_parts_that_do_not_tile(two) -> None:
    store, v1 = two
    cut = v1.shards[1]
    db = sqlite3.connect(store.path / "store.db")
    with db:
        db.execute("UPDATE shard_parts SET col_start = 9 WHERE shard_id = ? AND position = 1", (cut.id,))
    db.close()
    (problem,) = store.verify()
    assert problem.kind == "bad-slices" and problem.shard_ids == (cut.id,) and problem.version_ids == (v1.id,)
    assert "part 1 holds columns [9, 16) where column 8 comes next" in problem.detail


@pytest.mark.sqlite_only
def test_a_schema_2_store_opens_read_only_and_is_upgraded(two) -> None:
    store, v1 = two
    store.close()
    db = sqlite3.connect(store.path / "store.db")
    with db:
        db.execute("DELETE FROM shard_parts")  # a schema 2 store has no sliced shards
        db.execute("DELETE FROM version_shards WHERE shard_id = ?", (v1.shards[1].id,))
        db.execute("DROP TABLE shard_parts")
        db.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    db.close()
    old = ExpertStore.open(store.path, read_only=True)
    assert [s.parts for s in old.version(v1.id).shards] == [()] and old.verify() == []
    old.close()
    new = ExpertStore.open(store.path)
    v2 = new.commit(shards=[ExistingShard(v1.shards[0].id), sliced(new, 2, 4)], dense=dense(1), message="v2", parent=v1.id)
    assert torch.equal(new.load_shard(v2.shards[1])["u"], tensors(2)["u"])
    new.close()
