"""Sparse updates commit as delta shards: only the changed rows are written, checkout is exact."""

from __future__ import annotations

import torch

from lifelong.checkpoint import DELTA_MAX_SHARE, checkout_model, commit_model, init_store


def logits(model, idx):
    model.eval()
    with torch.no_grad():
        return model(idx)[0]


def test_a_few_changed_rows_commit_as_a_delta_and_check_out_bit_identically(tmp_path, tiny_config):
    store, v1 = init_store(str(tmp_path / "s"), tiny_config())
    model, origin = checkout_model(store, device="cpu")
    layer = model.peer_layers()["blocks.1.ffn"]
    changed = torch.tensor([3, 17, 40])
    with torch.no_grad():
        layer.expert_u[changed] += 1.0  # a sparse update: 3 of 64 expert rows
        layer.expert_v[changed[:1]] -= 0.5
    v2 = commit_model(store, model, origin=origin, message="sparse").version
    (shard,) = v2.shards
    assert shard.base_id == v1.shards[0].id and shard.is_delta
    assert shard.object_bytes < 0.2 * store.shard(shard.base_id).object_bytes  # only the changed rows were written
    again, _ = checkout_model(store, v2.id, device="cpu")
    idx = torch.randint(0, 200, (2, 16))
    assert torch.equal(logits(again, idx), logits(model, idx))
    assert torch.equal(again.peer_layers()["blocks.1.ffn"].expert_u, layer.expert_u)

    # Unchanged since the last commit: the same stored shard, nothing written.
    model2, origin2 = checkout_model(store, v2.id, device="cpu")
    v3 = commit_model(store, model2, origin=origin2, message="no change").version
    assert [s.id for s in v3.shards] == [shard.id]


def test_many_changed_rows_are_written_whole(tmp_path, tiny_config):
    store, v1 = init_store(str(tmp_path / "s"), tiny_config())
    model, origin = checkout_model(store, device="cpu")
    layer = model.peer_layers()["blocks.1.ffn"]
    n = int(layer.num_experts * DELTA_MAX_SHARE) + 1
    with torch.no_grad():
        layer.expert_u[:n] += 1.0
    v2 = commit_model(store, model, origin=origin, message="dense update").version
    (shard,) = v2.shards
    assert shard.base_id is None and shard.id != v1.shards[0].id
    again, _ = checkout_model(store, v2.id, device="cpu")
    assert torch.equal(again.peer_layers()["blocks.1.ffn"].expert_u, layer.expert_u)
