"""Null-space training of the dense maps: input records, the projection, the policy, the store."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lifelong.checkpoint import checkout_model, commit_model, init_store
from lifelong.config import CycleConfig, TrainConfig
from lifelong.growth import apply_policy
from lifelong.model import PEERLM
from lifelong.subspace import NullSpace, record_inputs
from lifelong.train import random_batches, train

L = 16


def blocks(n: int = 8, seed: int = 0, vocab: int = 256) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (n, L + 1)).astype(np.int64)


@pytest.fixture
def model(tiny_model) -> PEERLM:
    return tiny_model(block_size=L, peer_layers=[1])  # block 0 keeps a dense FFN: its maps are projected too


def test_every_linear_map_of_the_blocks_gets_an_input_record(model):
    names = set(model.linear_maps())
    assert names == {"blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.ffn.up", "blocks.0.ffn.down",
                     "blocks.1.attn.qkv", "blocks.1.attn.proj", "blocks.1.ffn.query"}
    assert all(float(m.input_cov.abs().sum()) == 0 for m in model.linear_maps().values())


def test_record_inputs_adds_one_unit_trace_per_stream(model):
    assert record_inputs(model, blocks()) > 0
    for m in model.linear_maps().values():
        cov = m.input_cov
        assert torch.allclose(cov, cov.t()) and float(cov.trace()) == pytest.approx(1.0, abs=1e-5)
        assert float(torch.linalg.eigvalsh(cov.double()).min()) > -1e-6  # positive semi-definite
    record_inputs(model, blocks(seed=1))
    assert all(float(m.input_cov.trace()) == pytest.approx(2.0, abs=1e-5) for m in model.linear_maps().values())
    assert record_inputs(model, blocks(0)) == 0  # nothing to record


def test_projected_updates_leave_old_directions_alone_and_move_new_ones(model):
    half = model.config.d_model // 2
    old = torch.zeros(model.config.d_model, model.config.d_model)
    old[:half, :half] = torch.eye(half)  # old inputs used only the first half of the coordinates
    for m in model.linear_maps().values():
        m.input_cov.copy_(old[: m.in_features, : m.in_features] if m.in_features == model.config.d_model else torch.eye(m.in_features))
    before = {n: m.weight.detach().clone() for n, m in model.linear_maps().items()}
    ns = NullSpace.before_training(model, energy=1.0)
    assert ns.ranks["blocks.0.attn.qkv"] == half and ns.ranks["blocks.0.ffn.down"] == 4 * model.config.d_model
    opt = torch.optim.AdamW(ns.weights, lr=0.1)
    for _ in range(3):
        for w in ns.weights:
            w.grad = torch.randn_like(w)
        opt.step()
        ns.project()
    x_old = torch.randn(5, model.config.d_model)
    x_old[:, half:] = 0
    x_new = torch.randn(5, model.config.d_model)
    x_new[:, :half] = 0
    qkv = model.linear_maps()["blocks.0.attn.qkv"]
    assert torch.allclose(x_old @ qkv.weight.detach().t(), x_old @ before["blocks.0.attn.qkv"].t(), atol=1e-5)
    assert not torch.allclose(x_new @ qkv.weight.detach().t(), x_new @ before["blocks.0.attn.qkv"].t(), atol=1e-2)
    # a map whose recorded inputs fill every direction (the FFN's down map here) cannot move at all
    assert torch.allclose(model.linear_maps()["blocks.0.ffn.down"].weight.detach(), before["blocks.0.ffn.down"], atol=1e-6)


def test_freeze_all_with_null_space_trains_the_maps_only_off_old_inputs(model):
    old = blocks(16, seed=3, vocab=64)  # an "old stream" of a few byte values
    record_inputs(model, old)
    cov = {n: m.input_cov.clone() for n, m in model.linear_maps().items()}
    before = {n: m.weight.detach().clone() for n, m in model.linear_maps().items()}
    cfg = CycleConfig(policy="freeze-all", grow_rows=2, null_space=True, null_space_energy=0.999, routing_isolation=False)
    growth = apply_policy(model, cfg, blocks(4, seed=4))
    assert set(growth.info["null_space_ranks"]) == set(model.linear_maps())
    assert all(m.weight.requires_grad for m in model.linear_maps().values())
    assert not model.embed.weight.requires_grad and not model.norm.weight.requires_grad
    new = blocks(16, seed=5, vocab=256)
    train(model, random_batches(new, 4, seed=0), TrainConfig(steps=5, batch_size=4, warmup_steps=1, lr=1e-2),
          progress=False, after_step=growth.after_step)
    moved = 0.0
    for name, w, proj in zip(growth.null_space.ranks, growth.null_space.weights, growth.null_space.projectors):
        delta = w.detach() - before[name]  # (d_out, d_in)
        assert torch.allclose(delta, delta @ proj, atol=1e-6), name  # nothing along the protected inputs
        protected = cov[name] @ (torch.eye(proj.shape[0]) - proj)  # the old inputs' energy inside the protected span
        assert float(protected.trace()) >= 0.999 * float(cov[name].trace()) - 1e-4, name
        moved += float(delta.abs().sum())
    assert moved > 0  # the maps did learn, off the old inputs


def test_a_version_without_input_records_leaves_the_maps_frozen(model):
    cfg = CycleConfig(policy="freeze-all", grow_rows=2, null_space=True, routing_isolation=False)
    growth = apply_policy(model, cfg, blocks(4))
    assert growth.null_space is not None and growth.null_space.ranks == {}
    assert set(growth.null_space.unrecorded) == set(model.linear_maps())
    assert not any(m.weight.requires_grad for m in model.linear_maps().values())


def test_input_records_are_committed_and_checked_out(tmp_path, tiny_config):
    store, _ = init_store(str(tmp_path / "s"), tiny_config(block_size=L))
    try:
        model, origin = checkout_model(store, device="cpu")
        assert all(float(m.input_cov.abs().sum()) == 0 for m in model.linear_maps().values())
        record_inputs(model, blocks())
        info = commit_model(store, model, message="recorded", origin=origin).version
        again, _ = checkout_model(store, info.id, device="cpu")
        for name, m in again.linear_maps().items():
            assert torch.equal(m.input_cov, model.linear_maps()[name].input_cov)
    finally:
        store.close()


def test_null_space_energy_out_of_range_is_a_config_error():
    from lifelong.errors import ConfigError

    for bad in (0.0, 1.5):
        with pytest.raises(ConfigError, match="null_space_energy"):
            CycleConfig(null_space_energy=bad)


def test_a_version_committed_before_input_records_checks_out_with_none(tmp_path, tiny_config, monkeypatch):
    store, _ = init_store(str(tmp_path / "s"), tiny_config(block_size=L))
    try:
        model, origin = checkout_model(store, device="cpu")
        record_inputs(model, blocks())
        plain = PEERLM.dense_state_dict
        monkeypatch.setattr(PEERLM, "dense_state_dict", lambda self: {k: v for k, v in plain(self).items() if not k.endswith("input_cov")})
        info = commit_model(store, model, message="as the previous release wrote it", origin=origin).version
        monkeypatch.undo()
        again, _ = checkout_model(store, info.id, device="cpu")
        assert all(float(m.input_cov.abs().sum()) == 0 for m in again.linear_maps().values())
    finally:
        store.close()
