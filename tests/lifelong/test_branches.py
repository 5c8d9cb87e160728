"""Policy branch: frozen dense branches, their posterior mixture, and what a version stores."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.func import functional_call

from expert_store import ExpertStore
from lifelong.branches import _as_branch, snapshot
from lifelong.checkpoint import checkout_model, commit_model, init_store
from lifelong.config import CycleConfig, TrainConfig
from lifelong.growth import apply_policy
from lifelong.model import PEERLM
from lifelong.peer import recording
from lifelong.train import random_batches, train

from cycle_testlib import BUDGET, cfg, cycle, make_store, registry

L = 16
GROW = 3


@pytest.fixture
def model(tiny_model) -> PEERLM:
    return tiny_model(block_size=L, peer_layers=[0, 1])


def blocks(n: int = 8, seed: int = 0, high: int = 256) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, high, (n, L + 1)).astype(np.int64)


def branch_cycle(model: PEERLM, steps: int = 6) -> None:
    """Policy branch on ``model``, then a few training steps on text unlike the branch's."""
    growth = apply_policy(model, CycleConfig(policy="branch", grow_rows=GROW), blocks(4))
    train(model, random_batches(blocks(8, seed=1, high=16), 4, seed=1),
          TrainConfig(batch_size=4, steps=steps, lr=3e-2, expert_lr=5e-2, warmup_steps=1), progress=False,
          after_step=growth.after_step)


def branch_logits(model: PEERLM, i: int, idx: torch.Tensor) -> torch.Tensor:
    b, was_training = model.branches[i], model.training
    model.eval()
    with torch.no_grad(), _as_branch(model, b, {n: None for n in model.peer_layers()}):
        out = functional_call(model, b.tensors, (idx,), {"mixture": False})[0]
    model.train(was_training)
    return out


def block_nll(logp: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL per block. logp: (B, L, V) log-probabilities (or logits)."""
    return -logp[:, :-1].log_softmax(-1).gather(-1, idx[:, 1:, None]).squeeze(-1).sum(1)  # (B,)


def test_branch_freezes_the_parent_and_trains_like_freeze_experts(model):
    idx = torch.from_numpy(blocks(4, seed=5)[:, :L])
    with torch.no_grad():
        parent = model.eval()(idx)[0]
    model.train()
    branch_cycle(model)
    assert len(model.branches) == 1
    assert model.branches[0].rows == {n: 8 for n in model.peer_layers()}  # the rows before growth
    for layer in model.peer_layers().values():
        assert layer.n_rows == 8 + GROW and layer.frozen_rows == 8 and not layer.query_frozen
    assert not torch.equal(model.embed.weight, model.branches[0].tensors["embed.weight"])  # the live weights trained
    # The branch predicts exactly as the parent did: same weights, and the new rows are invisible to it.
    assert torch.equal(branch_logits(model, 0, idx), parent)
    assert all(layer.visible_rows is None for layer in model.peer_layers().values())  # restored


def test_the_mixture_is_causal_and_within_log_k_of_the_best_branch(model):
    branch_cycle(model)
    model.eval()
    idx = torch.cat([torch.from_numpy(blocks(4, seed=7)[:, :L]), torch.from_numpy(blocks(4, seed=8, high=16)[:, :L])])
    with torch.no_grad():
        mix = model(idx)[0]  # (B, L, V) log-probabilities
        live = model(idx, mixture=False)[0]
    assert torch.allclose(mix.exp().sum(-1), torch.ones(mix.shape[:2]), atol=1e-5)
    nll = {"mix": block_nll(mix, idx), "branch": block_nll(branch_logits(model, 0, idx), idx), "live": block_nll(live, idx)}
    best = torch.minimum(nll["branch"], nll["live"])
    assert bool((nll["mix"] <= best + math.log(2) + 1e-4).all())  # the Bayes mixture's regret bound
    assert bool((nll["live"][4:] < nll["branch"][4:] - 1).all())  # the branches differ: the bound is not vacuous
    changed = idx.clone()
    changed[:, 9:] = (changed[:, 9:] + 1) % 256  # the future changes; positions <= 8 must not see it
    with torch.no_grad():
        assert torch.allclose(model(changed)[0][:, :9], mix[:, :9])
    model.train()
    assert torch.equal(model(idx)[0], model(idx, mixture=False)[0])  # training fits the live weights alone


def test_mixture_usage_weights_each_branch_by_its_posterior(model):
    model.branches.append(snapshot(model))  # a branch equal to the live weights: both halves of every share
    idx = torch.from_numpy(blocks(4)[:, :L])
    model.eval()
    with torch.no_grad(), recording(model.peer_layers(), usage=True, counts=True, queries=True) as mixed:
        model(idx)
    with torch.no_grad(), recording(model.peer_layers(), usage=True, counts=True, queries=True) as live:
        model(idx, mixture=False)
    for n in model.peer_layers():
        assert torch.allclose(mixed[n].usage, live[n].usage)  # 0.5 x usage + 0.5 x the same usage
        assert torch.equal(mixed[n].counts, live[n].counts) and len(mixed[n].queries) == 1  # the live weights' only


def test_branches_are_committed_and_checked_out(tmp_path, tiny_config):
    store, _ = init_store(str(tmp_path / "s"), tiny_config(block_size=L, peer_layers=[0, 1]))
    m, origin = checkout_model(store, device="cpu")
    plain = commit_model(store, m, origin=origin, message="no branches").version
    branch_cycle(m)
    v = commit_model(store, m, origin=origin, message="one branch").version
    back, _ = checkout_model(store, v.id, device="cpu")
    assert len(back.branches) == 1 and back.branches[0].rows == m.branches[0].rows
    assert all(torch.equal(back.branches[0].tensors[k], t) for k, t in m.branches[0].tensors.items())
    idx = torch.from_numpy(blocks(2)[:, :L])
    m.eval(), back.eval()
    with torch.no_grad():
        assert torch.equal(back(idx)[0], m(idx)[0])
    assert checkout_model(store, plain.id, device="cpu")[0].branches == []  # a version made without has none
    wide = back.double()  # branches follow .to() / .double() / .cuda()
    assert back.branches[0].tensors["embed.weight"].dtype == torch.float64
    with torch.no_grad():
        torch.testing.assert_close(wide(idx)[0].float(), m(idx)[0], atol=1e-3, rtol=0)  # float32 vs float64
    store.close()


def test_branch_on_a_dense_model_branches_without_growing(tiny_model):
    dense = tiny_model(block_size=L, peer_layers=[])
    growth = apply_policy(dense, CycleConfig(policy="branch"), blocks(2))
    assert growth.info == {"grown_rows": 0} and len(dense.branches) == 1 and all(p.requires_grad for p in dense.parameters())


@pytest.mark.parametrize("policy", ["branch", "freeze-experts"])
def test_a_branch_cycle_keeps_the_old_stream_within_the_bound(tmp_path, tiny_config, policy):
    """a (full) -> b: under branch, a's held-out loss rises by at most log 2 per block; under
    freeze-experts (the same training without the branch) it rises by more: the test can fail."""
    path = make_store(tmp_path / "root", tiny_config())
    store = ExpertStore.open(path)
    for s in "ab":
        registry(store).ingest(s, None, BUDGET, use_staged=False)
    cycle(store, "a", cfg("full", epochs=3.0))
    res = cycle(store, "b", cfg(policy, epochs=3.0))
    fgt = res.metrics["forgetting"]["a"]
    bound = 2 * math.log(2) / store_block(store)  # log 2 per block, over at least half a block of tokens
    if policy == "branch":
        assert fgt <= bound + 1e-6 and res.metrics["branches"] == 1
        assert res.metrics["routing_retention"]["a"] > 0.5  # mostly the old branch, which sees only old experts
    else:
        assert fgt > bound
    store.close()


def store_block(store: ExpertStore) -> int:
    return int(store.config["model"]["block_size"])


def test_past_max_branches_a_branch_cycle_runs_freeze_all_and_says_so(tmp_path, tiny_config):
    store = ExpertStore.open(make_store(tmp_path / "root", tiny_config()))
    for s in "abc":
        registry(store).ingest(s, None, BUDGET, use_staged=False)
    cycle(store, "a", cfg("full", epochs=0.25))
    assert cycle(store, "b", cfg("branch", max_branches=1, epochs=0.25)).metrics["policy"] == "branch"
    said: list[str] = []
    res = cycle(store, "c", cfg("branch", max_branches=1, epochs=0.25), log=said.append)
    assert res.metrics["policy"] == "freeze-all" and res.metrics["branches"] == 1
    assert any("has 1 branches (--max-branches 1)" in line and "freeze-all" in line for line in said)
    assert len(checkout_model(store, res.version, device="cpu")[0].branches) == 1  # kept, not grown
    said.clear()
    store.rollback(res.version - 1, why="test: back before c")
    cycle(store, "c", cfg("sparse", top_t=4, epochs=0.25), log=said.append)  # trains experts the frozen branch reads: said
    assert any("1 frozen branches" in line and "policy sparse trains the experts they share" in line for line in said)
    store.close()
