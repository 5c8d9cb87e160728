"""Model <-> expert store: bit-identical checkout, shared frozen shards, mismatches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from expert_store import Residency
from lifelong import ModelConfig, PEERLM, TrainConfig, random_batches, train
from lifelong.checkpoint import StoreMismatchError, checkout_model, commit_model, init_store


@pytest.fixture
def two_layer_config(tiny_config) -> ModelConfig:
    """The tiny model with PEER in both blocks: two layers' shards to share or rewrite."""
    return tiny_config(peer_layers=[0, 1])


def blocks(seed=0):
    return np.random.default_rng(seed).integers(0, 100, size=(32, 33))


def short_train(model, seed=0):
    train(model, random_batches(blocks(seed), 4, seed), TrainConfig(steps=4, batch_size=4, warmup_steps=1), progress=False)


def logits(model, idx):
    model.eval()
    with torch.no_grad():
        return model(idx)[0]


def test_checkout_is_bit_identical_to_committed_model(tmp_path, two_layer_config):
    store, v1 = init_store(str(tmp_path / "s"), two_layer_config)
    model, origin = checkout_model(store, "HEAD", device="cpu")
    assert origin.version.id == v1.id
    short_train(model)
    v2 = commit_model(store, model, origin=origin, message="trained").version
    idx = torch.randint(0, 100, (2, 16))
    expected = logits(model, idx)
    again, _ = checkout_model(store, v2.id, device="cpu")
    assert torch.equal(logits(again, idx), expected)
    old, _ = checkout_model(store, v1.id, device="cpu")
    assert not torch.equal(logits(old, idx), expected)


def test_growth_commits_only_the_new_shard_and_checkout_reuses_frozen(tmp_path, monkeypatch, two_layer_config):
    store, _ = init_store(str(tmp_path / "s"), two_layer_config)
    residency = Residency(store, "cpu")
    model, origin = checkout_model(store, device="cpu", residency=residency)
    v1 = origin.version
    for layer in model.peer_layers().values():
        layer.freeze()
        layer.grow(2)
    short_train(model)
    m2_origin = commit_model(store, model, origin=origin, message="grown")
    v2 = m2_origin.version
    shared = {s.id for s in v1.shards} & {s.id for s in v2.shards}
    assert len(shared) == 2  # each layer's old shard (trainable in v1, frozen unchanged since) is reused
    assert len(v2.shards) == 4
    diff = store.diff(v1.id, v2.id)
    assert len(diff.shared_shards) == 2 and sum(len(l.added) for l in diff.layers.values()) == 2
    # Moving v2 -> v1 with one residency reads no shard from disk: v1's shards are v2's
    # frozen ones, resident as views of m2's tables.
    loads: list[int] = []
    load_shard = store.load_shard
    monkeypatch.setattr(store, "load_shard", lambda shard, *a, **kw: loads.append(getattr(shard, "id", shard)) or load_shard(shard, *a, **kw))
    m2, _ = checkout_model(store, v2.id, device="cpu", residency=residency)
    assert sorted(loads) == sorted(s.id for s in v2.shards)  # the first checkout of v2 reads all four
    loads.clear()
    m1, _ = checkout_model(store, v1.id, device="cpu", residency=residency)
    assert loads == []
    n = two_layer_config.peer.n_rows
    assert m1.peer_layers()["blocks.0.ffn"].n_rows == n
    idx = torch.randint(0, 100, (2, 16))
    assert torch.equal(logits(m2, idx), logits(model, idx))
    layer = m2.peer_layers()["blocks.0.ffn"]
    assert layer.frozen_rows == n and layer.n_rows == n + 2 and not layer.col_keys.requires_grad
    # Frozen shards of a checked-out model are still shared by the next commit.
    short_train(m2, seed=1)
    v3 = commit_model(store, m2, origin=m2_origin, message="more").version
    assert shared <= {s.id for s in v3.shards}
    # Without an origin nothing is known to be stored: every shard is written anew.
    v4 = commit_model(store, m2, message="no origin").version
    assert not ({s.id for s in v4.shards} & {s.id for s in v3.shards})


def test_trained_shard_is_rewritten_even_if_later_frozen(tmp_path, two_layer_config):
    store, v1 = init_store(str(tmp_path / "s"), two_layer_config)
    model, origin = checkout_model(store, device="cpu")
    short_train(model)  # changes the (trainable) first shard
    for layer in model.peer_layers().values():
        layer.freeze()
    v2 = commit_model(store, model, origin=origin, message="trained then frozen").version
    assert not ({s.id for s in v1.shards} & {s.id for s in v2.shards})
    again, _ = checkout_model(store, v2.id, device="cpu")
    idx = torch.randint(0, 100, (1, 8))
    assert torch.equal(logits(again, idx), logits(model, idx))


def test_config_mismatch_is_refused(tmp_path, two_layer_config, tiny_config):
    store, _ = init_store(str(tmp_path / "s"), two_layer_config)
    other = PEERLM(tiny_config(n_layers=3))  # a deliberately different shape
    with pytest.raises(StoreMismatchError, match="n_layers"):
        commit_model(store, other, message="wrong")
    assert len(store.versions()) == 1
