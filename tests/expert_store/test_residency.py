"""Residency: reuse shared shards, load only the others, budget refusal, byte accounting."""

from __future__ import annotations

import pytest
import torch

from expert_store import BudgetExceededError, ExistingShard, ExpertStore, Residency

from store_testlib import LAYER, dense, new_shard, tensors


@pytest.fixture
def two_versions(store: ExpertStore):
    v1 = store.commit(
        shards=[new_shard(0, 0, frozen=True), new_shard(1, 0, layer="blocks.1.peer", frozen=True)],
        dense=dense(0), message="v1", parent=None,
    )
    v2 = store.commit(
        shards=[ExistingShard(s.id) for s in v1.shards] + [new_shard(2, 4)],
        dense=dense(1), message="v2", parent=v1.id,
    )
    return v1, v2


def shard_bytes() -> int:
    return sum(t.nbytes for t in tensors(0).values())


def test_checkout_reuses_shared_shards_and_loads_only_the_new_one(store: ExpertStore, two_versions) -> None:
    v1, v2 = two_versions
    residency = Residency(store, "cpu")
    first = residency.checkout(v1.id)
    assert sorted(first.loaded) == sorted(s.id for s in v1.shards) and first.reused == []
    kept = {info.id: t["u"] for layer in first.layers.values() for info, t in layer}

    second = residency.checkout(v2.id)
    assert second.loaded == [v2.shards[2].id]
    assert sorted(second.reused) == sorted(kept)
    assert second.bytes_loaded == shard_bytes()
    for layer in second.layers.values():
        for info, t in layer:
            if info.id in kept:
                assert t["u"] is kept[info.id] and t["u"].data_ptr() == kept[info.id].data_ptr()
            assert torch.equal(t["u"], store.load_shard(info)["u"])
    assert [info.row_start for info, _ in second.layers[LAYER]] == [0, 4]

    back = residency.checkout(v1.id)  # rollback: the new shard is evicted, nothing loaded
    assert back.loaded == [] and back.evicted == [v2.shards[2].id]


def test_bytes_accounting(store: ExpertStore, two_versions) -> None:
    _, v2 = two_versions
    residency = Residency(store, "cpu")
    residency.checkout(v2.id)
    assert residency.resident_bytes() == 3 * shard_bytes() == v2.shard_bytes
    assert residency.bytes_by_layer() == {LAYER: 2 * shard_bytes(), "blocks.1.peer": shard_bytes()}
    assert residency.bytes_by_device() == {"cpu": 3 * shard_bytes()}
    residency.evict()
    assert residency.resident_bytes() == 0 and residency.bytes_by_device() == {}


def test_budget_refusal_happens_before_loading(store: ExpertStore, two_versions) -> None:
    v1, v2 = two_versions
    budget = 2 * shard_bytes()  # fits v1 (2 shards), not v2 (3 shards)
    residency = Residency(store, "cpu", budget_bytes=budget)
    residency.checkout(v1.id)
    before = {s.id for s in residency.resident_shards()}
    with pytest.raises(BudgetExceededError) as info:
        residency.checkout(v2.id)
    err = info.value
    assert (err.needed, err.resident, err.budget) == (3 * shard_bytes(), 2 * shard_bytes(), budget)
    for number in (err.needed, err.resident, err.budget):
        assert str(number) in str(err)
    assert {s.id for s in residency.resident_shards()} == before  # nothing loaded or evicted


def test_checkout_within_budget_evicts_first(store: ExpertStore) -> None:
    a = store.commit(shards=[new_shard(0, 0), new_shard(1, 4)], dense=dense(0), message="a", parent=None)
    b = store.commit(shards=[ExistingShard(a.shards[0].id), new_shard(2, 4)], dense=dense(1), message="b", parent=a.id)
    residency = Residency(store, "cpu", budget_bytes=2 * shard_bytes())
    residency.checkout(a.id)
    result = residency.checkout(b.id)  # 2 resident + 1 to load > budget: evict before loading
    assert result.evicted == [a.shards[1].id] and result.loaded == [b.shards[1].id]
    assert residency.resident_bytes() == 2 * shard_bytes()
