"""PEER LM: shapes, parameter groups, learning, generation, config errors; the demo CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lifelong import ConfigError, ModelConfig, PEERConfig, PEERLM, TrainConfig, evaluate_loss, random_batches, train


def pattern_blocks(n=64, length=33, seed=0):
    rng = np.random.default_rng(seed)
    base = np.frombuffer(b"the quick brown fox jumps over the lazy dog. ", dtype=np.uint8).astype(np.int64)
    starts = rng.integers(0, len(base), n)
    tiled = np.tile(base, 4)
    return np.stack([tiled[s : s + length] for s in starts])


def test_forward_shapes_and_peer_placement(tiny_config):
    torch.manual_seed(0)
    model = PEERLM(tiny_config(n_layers=3))
    assert list(model.peer_layers()) == ["blocks.1.ffn"]  # the middle block of 3
    idx = torch.randint(0, 260, (2, 16))
    logits, loss = model(idx, idx)
    assert logits.shape == (2, 16, 260) and loss.ndim == 0
    dense = PEERLM(tiny_config(peer_layers=[]))
    assert dense.peer_layers() == {}


def test_param_groups_partition_trainable_parameters(tiny_config):
    model = PEERLM(tiny_config(n_layers=3, peer_layers=[0, 2]))
    groups = model.param_groups()
    assert len(groups["expert"]) == 2
    ids = [id(p) for g in ("key", "query", "dense") for p in groups[g]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}
    layer = model.peer_layers()["blocks.0.ffn"]
    layer.freeze()
    groups = model.param_groups()
    assert all(p is not layer.col_keys for p in groups["key"])
    dense_keys = model.dense_state_dict()
    assert not any(k.endswith(("expert_u", "expert_v", "row_keys")) for k in dense_keys)


def test_training_reduces_held_out_loss_and_keeps_frozen_experts(tiny_config):
    torch.manual_seed(0)
    model = PEERLM(tiny_config())
    blocks = pattern_blocks()
    before = evaluate_loss(model, blocks[:16])
    layer = model.peer_layers()["blocks.1.ffn"]
    layer.freeze()
    layer.grow(2)
    frozen_u = layer.expert_u[: layer.trainable_start].clone()
    grown_u = layer.expert_u[layer.trainable_start :].clone()
    assert len(grown_u) == 2 * layer.n_cols
    cfg = TrainConfig(steps=60, batch_size=8, lr=3e-3, expert_lr=3e-2, warmup_steps=5)
    result = train(model, random_batches(blocks, 8, 0), cfg, eval_blocks=blocks[:16], progress=False)
    assert result.eval_losses[-1][1] < before - 1.0
    assert torch.equal(layer.expert_u[: layer.trainable_start], frozen_u)
    assert not torch.equal(layer.expert_u[layer.trainable_start :], grown_u)  # the grown rows trained


def test_generate_respects_length_and_is_seeded(tiny_config):
    torch.manual_seed(0)
    model = PEERLM(tiny_config(block_size=32))
    prompt = torch.tensor([[1, 2, 3]])
    a = model.generate(prompt, 10, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(1))
    b = model.generate(prompt, 10, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(1))
    assert a.shape == (1, 13) and torch.equal(a, b)
    greedy = model.generate(prompt, 40, temperature=0)  # longer than block_size: context is cropped
    assert greedy.shape == (1, 43)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(peer_layers=[5]), "peer_layers"),
        (dict(n_heads=3), "n_heads"),
    ],
)
def test_model_config_errors_name_the_field(kwargs, field, tiny_config):
    with pytest.raises(ConfigError, match=f"'{field}'"):
        tiny_config(**kwargs)


def test_d_model_mismatch_is_a_config_error():
    with pytest.raises(ConfigError, match="'peer.d_model'"):
        ModelConfig(d_model=64, peer=PEERConfig(d_model=32, n_rows=16, n_cols=16))


def test_too_long_sequence_is_a_clear_error(tiny_config):
    model = PEERLM(tiny_config())
    model(torch.zeros(1, model.config.block_size, dtype=torch.long))  # exactly block_size fits
    with pytest.raises(ConfigError, match="block_size"):
        model(torch.zeros(1, model.config.block_size + 1, dtype=torch.long))


def test_optimizer_state_resumes_when_it_fits(tiny_config):
    torch.manual_seed(0)
    model = PEERLM(tiny_config())
    blocks = pattern_blocks()
    cfg = TrainConfig(steps=3, batch_size=8, warmup_steps=1)
    first = train(model, random_batches(blocks, 8, 0), cfg, progress=False)
    assert not first.resumed_optimizer and any(k.startswith("adamw.") for k in first.optimizer_state)
    second = train(model, random_batches(blocks, 8, 1), cfg, progress=False, optimizer_state=first.optimizer_state)
    assert second.resumed_optimizer
    assert float(second.optimizer_state["adamw.0.step"]) == 6  # continued, not restarted
    # After growth the trainable parameters change shape: AdamW starts fresh, expert rows keep state.
    layer = model.peer_layers()["blocks.1.ffn"]
    layer.freeze()
    layer.grow(2)
    third = train(model, random_batches(blocks, 8, 2), cfg, progress=False, optimizer_state=second.optimizer_state)
    assert not third.resumed_optimizer
    assert int(third.optimizer_state["rows.0.start"]) == layer.trainable_start
