"""Growth policies (what grows, what trains, what freezes) and the new row keys' start."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from lifelong.checkpoint import checkout_model, commit_model, init_store
from lifelong.config import CycleConfig, TrainConfig
from lifelong.errors import ConfigError
from lifelong.growth import SparseSelection, apply_policy, init_new_keys, record_anchors, record_background
from lifelong.model import PEERLM
from lifelong.peer import recording
from lifelong.train import random_batches, train

L = 16
ROWS = 8  # tiny_config's n_rows
COLS = 8
GROW = 3


@pytest.fixture
def model(tiny_model) -> PEERLM:
    return tiny_model(block_size=L, peer_layers=[0, 1])


def new_blocks(n: int = 4, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, L + 1)).astype(np.int64)


def policy(name: str, **kw) -> CycleConfig:
    return CycleConfig(policy=name, grow_rows=GROW, **kw)


def peer_param_ids(model: PEERLM) -> set[int]:
    return {id(p) for layer in model.peer_layers().values() for p in layer.parameters()}


def dense_params(model: PEERLM) -> list[torch.nn.Parameter]:
    ids = peer_param_ids(model)
    return [p for p in model.parameters() if id(p) not in ids]


def query_params(layer) -> list[torch.nn.Parameter]:
    return list(layer.query.parameters()) + list(layer.query_norm.parameters())


def test_full_trains_everything_and_grows_nothing(model):
    for layer in model.peer_layers().values():  # an earlier freeze-all cycle left it frozen
        layer.freeze()
        layer.grow(1)
        layer.freeze_query()
    growth = apply_policy(model, policy("full"), new_blocks())
    assert growth.info == {"grown_rows": 0} and growth.isolation is None and growth.after_step is None
    assert all(p.requires_grad for p in model.parameters())
    for layer in model.peer_layers().values():
        assert (layer.n_rows, layer.frozen_rows, layer.trainable_start) == (ROWS + 1, 0, 0)
        assert layer.row_keys.shape[0] == ROWS + 1 and not layer.query_frozen
        assert not any(s.frozen for s in layer.shards)


def test_freeze_experts_grows_freezes_old_and_trains_queries_and_dense(model):
    old = {n: (l.expert_u.clone(), l.all_row_keys().detach().clone(), l.col_keys.detach().clone())
           for n, l in model.peer_layers().items()}
    growth = apply_policy(model, policy("freeze-experts"), new_blocks())
    assert growth.info == {"grown_rows": GROW, "routing_isolation": False}  # no anchors yet: nothing to isolate
    assert growth.isolation is None and growth.after_step is None
    assert all(p.requires_grad for p in dense_params(model))
    for name, layer in model.peer_layers().items():
        u0, keys0, cols0 = old[name]
        assert (layer.n_rows, layer.frozen_rows) == (ROWS + GROW, ROWS)
        assert layer.trainable_start == ROWS * COLS and layer.num_experts == (ROWS + GROW) * COLS
        assert layer.row_keys.shape == (GROW, 8) and layer.row_keys.requires_grad  # only the new rows
        assert not layer.col_keys.requires_grad
        assert all(p.requires_grad for p in query_params(layer)) and not layer.query_frozen
        assert torch.equal(layer.expert_u[: ROWS * COLS], u0)
        assert torch.equal(layer.frozen_row_keys, keys0) and torch.equal(layer.col_keys, cols0)
        assert [s.frozen for s in layer.shards] == [True, False]
    groups = model.param_groups()
    assert groups["dense"] and groups["query"]
    assert {id(p) for p in groups["key"]} == {id(l.row_keys) for l in model.peer_layers().values()}


def test_freeze_all_trains_only_the_new_rows(model):
    apply_policy(model, policy("freeze-all"), new_blocks())
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(l.row_keys) for l in model.peer_layers().values()}
    for layer in model.peer_layers().values():
        assert layer.row_keys.shape == (GROW, 8) and layer.frozen_rows == ROWS
        assert layer.query_frozen and not any(p.requires_grad for p in query_params(layer))
    groups = model.param_groups()
    assert groups["dense"] == [] and groups["query"] == [] and len(groups["expert"]) == 2
    model.train()
    for layer in model.peer_layers().values():
        assert layer.training and not layer.query_norm.training  # frozen BatchNorm statistics
    norm = model.peer_layers()["blocks.0.ffn"].query_norm
    stats = norm.running_mean.clone()
    model(torch.from_numpy(new_blocks()[:, :-1]))
    assert torch.equal(norm.running_mean, stats)


def test_a_later_freeze_experts_cycle_trains_the_queries_again(model):
    apply_policy(model, policy("freeze-all"), new_blocks())
    apply_policy(model, policy("freeze-experts"), new_blocks(seed=1))
    model.train()
    for layer in model.peer_layers().values():
        assert (layer.n_rows, layer.frozen_rows) == (ROWS + 2 * GROW, ROWS + GROW)
        assert not layer.query_frozen and layer.query_norm.training
        assert all(p.requires_grad for p in query_params(layer))
    assert all(p.requires_grad for p in dense_params(model))


def test_init_new_keys_shape_norm_and_seed(model):
    blocks = new_blocks()
    keys = init_new_keys(model, blocks, 5, seed=0)
    assert set(keys) == set(model.peer_layers())
    for name, layer in model.peer_layers().items():
        k = keys[name]
        assert k.shape == (5, 8) and k.dtype == layer.expert_u.dtype
        largest = layer.all_row_keys().detach().norm(dim=1).max()
        torch.testing.assert_close(k.norm(dim=1), largest.expand(5))
        assert layer._recording is None
    again = init_new_keys(model, blocks, 5, seed=0)
    assert all(torch.equal(keys[n], again[n]) for n in keys)
    other = init_new_keys(model, blocks, 5, seed=1)
    assert not all(torch.equal(keys[n], other[n]) for n in keys)


def test_init_new_keys_with_fewer_queries_than_rows(model):
    keys = init_new_keys(model, new_blocks(1)[:, :3], 40, seed=0)  # 2 tokens x 2 heads = 4 queries
    for name, layer in model.peer_layers().items():
        assert keys[name].shape == (40, 8)
        assert bool(torch.isfinite(keys[name]).all())
        torch.testing.assert_close(keys[name].norm(dim=1), layer.all_row_keys().detach().norm(dim=1).max().expand(40))


def test_grown_keys_come_from_the_new_data_and_route_it_to_new_experts(model):
    blocks = new_blocks(8)
    expected = init_new_keys(copy.deepcopy(model), blocks, GROW, seed=7)
    by_queries, by_random = copy.deepcopy(model), copy.deepcopy(model)
    apply_policy(by_queries, policy("freeze-experts", seed=7), blocks)
    torch.manual_seed(0)
    apply_policy(by_random, policy("freeze-experts", key_init="random"), blocks)
    shares = {}
    for label, m in (("queries", by_queries), ("random", by_random)):
        m.eval()
        with recording(m.peer_layers(), usage=True) as recs, torch.no_grad():
            m(torch.from_numpy(blocks[:, :-1]))
        shares[label] = [float(recs[n].usage[l.trainable_start :].sum() / recs[n].usage.sum()) for n, l in m.peer_layers().items()]
    for name, layer in by_queries.peer_layers().items():
        torch.testing.assert_close(layer.row_keys.detach(), expected[name])
    for name, layer in by_random.peer_layers().items():
        assert layer.n_rows == ROWS + GROW and layer.row_keys.shape == (GROW, 8)  # random also grows
        assert not torch.allclose(layer.row_keys.detach(), expected[name])
    # the new rows are 3/11 of the grid; keys from the new data's queries take more than that
    assert min(shares["queries"]) > GROW / (ROWS + GROW)
    assert np.mean(shares["queries"]) > np.mean(shares["random"]) + 0.15


@pytest.mark.parametrize("name", ["freeze-experts", "freeze-all"])
def test_growth_with_anchors_isolates_the_new_rows_unless_turned_off(model, name):
    record_anchors(model, new_blocks(2, seed=5))
    off = copy.deepcopy(model)
    growth = apply_policy(model, policy(name), new_blocks())
    assert growth.info["routing_isolation"] is True and isinstance(growth.info["isolation_keys_moved_at_growth"], int)
    iso = growth.isolation
    assert iso is not None and growth.after_step == iso.project
    for n, layer in model.peer_layers().items():  # it guards the trainable (new) row keys, one bound per anchor
        assert iso.layers[n] is layer and layer.row_keys.shape == (GROW, 8)
        assert iso.allowed[n].shape == (layer.anchors.shape[0],)
    plain = apply_policy(off, policy(name, routing_isolation=False), new_blocks())
    assert plain.info == {"grown_rows": GROW, "routing_isolation": False} and plain.isolation is None
    assert plain.after_step is None
    full = apply_policy(copy.deepcopy(model), policy("full"), new_blocks())
    assert full.isolation is None and full.info == {"grown_rows": 0}  # no growth: nothing to isolate


# ---------------------------------------------------------------------------- sparse memory finetuning
def train_steps(model: PEERLM, growth, steps: int = 4, seed: int = 1) -> None:
    cfg = TrainConfig(batch_size=4, steps=steps, lr=1e-2, expert_lr=5e-2, warmup_steps=1)
    train(model, random_batches(new_blocks(8, seed=seed), 4, seed=seed), cfg, progress=False,
          after_step=growth.after_step, select_rows=growth.sparse)


def tables(model: PEERLM) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {n: (l.expert_u.clone(), l.expert_v.clone()) for n, l in model.peer_layers().items()}


def changed_rows(before, model: PEERLM) -> dict[str, set[int]]:
    out = {}
    for n, layer in model.peer_layers().items():
        u0, v0 = before[n]
        m = u0.shape[0]
        diff = (layer.expert_u[:m] != u0).any(1) | (layer.expert_v[:m] != v0).any(1)
        out[n] = set(diff.nonzero().squeeze(1).tolist())
    return out


def test_sparse_selection_ranks_by_tf_idf_and_keeps_grown_experts():
    # expert 0: used a lot in the batch but by every background batch (idf 0); expert 1: a
    # little, never in the background; expert 2: unused now; ids 4.. grew after the selection
    idf = [torch.log(torch.tensor(5.0) / (torch.tensor([4.0, 0.0, 0.0, 2.0]) + 1))]
    sel = SparseSelection(idf, top_t=1)
    (keep,) = sel([torch.tensor([9, 1, 0, 0])])
    assert keep.tolist() == [1]  # rare in the background wins over frequent everywhere
    (keep,) = SparseSelection(idf, top_t=3)([torch.tensor([9, 1, 0, 3, 0, 2, 5])])
    assert sorted(keep.tolist()) == [0, 1, 3, 5, 6]  # top-3 old by score (0 scores last), every used new one
    (keep,) = sel([torch.zeros(4, dtype=torch.long)])
    assert keep.numel() == 0  # nothing retrieved: nothing trains


def test_sparse_trains_only_top_t_rows_per_step_and_nothing_else(model):
    record_background(model, new_blocks(8, seed=3), batch_size=4)
    dense_before = {k: v.clone() for k, v in model.state_dict().items() if "expert_" not in k}
    before = tables(model)
    growth = apply_policy(model, policy("sparse", top_t=2), new_blocks())
    assert growth.info["grown_rows"] == 0 and growth.info["top_t"] == 2 and growth.sparse is not None
    assert not any(p.requires_grad for p in model.parameters())  # keys, queries, dense parts: frozen
    steps = 3
    train_steps(model, growth, steps=steps)
    for n, rows in changed_rows(before, model).items():
        assert 0 < len(rows) <= 2 * steps, (n, rows)  # at most top_t rows per step
    after = model.state_dict()
    for k, v in dense_before.items():
        if "running_" not in k and "num_batches" not in k:
            assert torch.equal(after[k], v), k


def test_sparse_growth_isolates_new_rows_and_updates_old_experts_only_where_picked(model):
    record_anchors(model, new_blocks(2, seed=5))
    record_background(model, new_blocks(8, seed=3), batch_size=4)
    keys_before = {n: l.all_row_keys().detach().clone() for n, l in model.peer_layers().items()}
    before = tables(model)
    growth = apply_policy(model, policy("sparse", top_t=2, sparse_growth=True), new_blocks())
    assert growth.info["grown_rows"] == GROW and growth.info["routing_isolation"] is True and growth.info["top_t"] == 2
    assert growth.isolation is not None and growth.sparse is not None
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(l.row_keys) for l in model.peer_layers().values()}  # the new rows' keys only
    for layer in model.peer_layers().values():
        assert layer.frozen_rows == ROWS and layer.trainable_start == 0 and layer.query_frozen
        assert not any(s.frozen for s in layer.shards)  # a commit compares the old shards' rows
    grown_before = {n: l.expert_u[ROWS * COLS :].clone() for n, l in model.peer_layers().items()}
    steps = 3
    train_steps(model, growth, steps=steps)
    changed = changed_rows(before, model)
    for n, layer in model.peer_layers().items():
        assert torch.equal(layer.frozen_row_keys, keys_before[n])  # old keys: routing of old rows unchanged
        assert len(changed[n]) <= 2 * steps  # old experts: at most top_t rows per step
        assert not torch.equal(layer.expert_u[ROWS * COLS :], grown_before[n])  # the new rows learn
    assert sum(map(len, changed.values())) > 0
    assert growth.isolation.violations() == 0
    # the next cycle's freeze closes the old experts again
    apply_policy(model, policy("freeze-all"), new_blocks())
    assert all(l.trainable_start == l.frozen_rows * COLS and not l.old_experts_open for l in model.peer_layers().values())


def test_top_t_above_the_experts_of_a_layer_is_a_config_error(model):
    for cfg in (policy("sparse", top_t=10_000), policy("sparse", top_t=10_000, sparse_growth=True)):
        with pytest.raises(ConfigError, match="top_t=10000 exceeds the 64 experts"):
            apply_policy(copy.deepcopy(model), cfg, new_blocks())


def test_background_counts_retrievals_so_tf_idf_does_not_saturate(model):
    blocks = new_blocks(8, seed=3)
    assert record_background(model, blocks, batch_size=4, max_batches=1) == 1  # the first batch only
    for layer in model.peer_layers().values():
        heads, k = layer.config.heads, layer.config.top_k
        assert float(layer.background_docs) == 4 * L * heads  # one document per (token, head) retrieval
        assert float(layer.background.sum()) == 4 * L * heads * k
    # a batch of 64 tokens touches nearly every one of the 64 experts: per-batch presence would
    # give almost every expert idf 0; per retrieval the idf still tells them apart
    (idf, *_) = SparseSelection.of(model, top_t=4).idf
    assert int((idf > 0).sum()) == 64 and float(idf.max() - idf.min()) > 0.5


def test_a_version_that_counted_background_batches_checks_out_and_runs_sparse(tmp_path, tiny_config):
    store, _ = init_store(str(tmp_path / "s"), tiny_config(block_size=L, peer_layers=[0, 1]))
    m, origin = checkout_model(store, device="cpu")
    for layer in m.peer_layers().values():  # as the previous release recorded it: per-batch presence
        layer.background += 3.0
    dense = m.dense_state_dict
    renamed = lambda: {(k.replace(".background_docs", ".background_batches")): (v + 3 if k.endswith("_docs") else v)
                       for k, v in dense().items()}
    m.dense_state_dict = renamed
    v = commit_model(store, m, origin=origin, message="as an older version").version
    assert any(k.endswith(".background_batches") for k in store.load_dense(v.id))
    old, _ = checkout_model(store, v.id, device="cpu")
    for layer in old.peer_layers().values():
        assert float(layer.background_docs) == 3.0 and float(layer.background.max()) == 3.0
    growth = apply_policy(old, policy("sparse", top_t=4), new_blocks())
    train_steps(old, growth, steps=1)  # trains, and the next background adds retrieval counts on top
    store.close()


@pytest.mark.parametrize("cfg", [policy("freeze-all"), policy("freeze-experts"), policy("sparse"), policy("sparse", sparse_growth=True)],
                         ids=["freeze-all", "freeze-experts", "sparse", "sparse-growth"])
def test_growth_and_sparse_on_a_dense_model_are_a_clear_error(tiny_model, cfg):
    dense = tiny_model(block_size=L, peer_layers=[])
    with pytest.raises(ConfigError, match="the model has none"):
        apply_policy(dense, cfg, new_blocks())
    assert apply_policy(dense, policy("full"), new_blocks()).info == {"grown_rows": 0}  # a dense fine-tune is fine
