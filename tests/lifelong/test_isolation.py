"""Routing isolation (issue 11 section 1): query anchors, the bounds taken before a growth,
the projection of the new row keys, and the retention figures of lifelong.evaluate.

"Well-posed" models below have every anchor's bound positive (each row key has its
negation among the rows, and the column keys are small), so shrinking the new keys always
reaches the allowed region, also when some anchors' bounds are negative.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lifelong.checkpoint import checkout_model, commit_model, init_store
from lifelong.config import CycleConfig, TrainConfig
from lifelong.evaluate import experts_when_trained, routing_retention
from lifelong.growth import RoutingIsolation, apply_policy, record_anchors
from lifelong.model import PEERLM
from lifelong.peer import product_key_topk, recording
from lifelong.train import random_batches, train

L = 16
OLD = 8 * 8  # experts per layer before a growth (tiny_config's 8 x 8 grid)
GROW = 3


def blocks(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, L + 1)).astype(np.int64)


def make_well_posed(model: PEERLM) -> PEERLM:
    """Rows 4..7 = -(rows 0..3), column keys x 0.1: some row scores >= 0 for any query and
    the columns barely matter, so every anchor's bound s_k - max_j q2 . C2_j is > 0."""
    with torch.no_grad():
        for layer in model.peer_layers().values():
            layer.row_keys[4:] = -layer.row_keys[:4]
            layer.col_keys.mul_(0.1)
    return model


@pytest.fixture
def model(tiny_model) -> PEERLM:
    return tiny_model(block_size=L, peer_layers=[0, 1])


def queries_of(model: PEERLM, x: np.ndarray) -> dict[str, torch.Tensor]:
    """Every query (heads flattened) of the tokens x[:, :-1], per layer, in eval mode."""
    model.eval()
    with recording(model.peer_layers(), queries=True) as recs, torch.no_grad():
        model(torch.from_numpy(x[:, :-1]))
    return {n: torch.cat(r.queries).reshape(-1, model.peer_layers()[n].config.d_key) for n, r in recs.items()}


def new_ids_in_topk(model: PEERLM, old: int = OLD) -> dict[str, int]:
    """Per layer: anchors whose exact top-k (the grown keys) holds an expert id >= ``old``."""
    out = {}
    for name, layer in model.peer_layers().items():
        _, ids = product_key_topk(layer.anchors, layer.all_row_keys().detach(), layer.col_keys.detach(), layer.config.top_k)
        out[name] = int((ids >= old).any(-1).sum())
    return out


def grow_at_anchors(model: PEERLM, norm: float = 10.0) -> None:
    """Freeze, then grow rows whose keys point at the first anchors' row halves, with a
    large norm: without isolation the new experts win those anchors' top-k."""
    for layer in model.peer_layers().values():
        layer.freeze()
        q1 = layer.anchors[:GROW].chunk(2, dim=-1)[0]
        layer.grow(GROW, init_keys=q1 / q1.norm(dim=1, keepdim=True) * norm)


def freeze_all_but_new_rows(model: PEERLM) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in model.peer_layers().values():
        layer.row_keys.requires_grad_(True)
        layer.freeze_query()


def train_steps(model: PEERLM, x: np.ndarray, steps: int, after_step=None) -> None:
    cfg = TrainConfig(steps=steps, batch_size=4, warmup_steps=1, lr=0.05, expert_lr=0.05)
    train(model, random_batches(x, 4, 0), cfg, progress=False, after_step=after_step)


def logits(model: PEERLM, x: np.ndarray) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(torch.from_numpy(x[:, :-1]))[0]


# -- record_anchors ------------------------------------------------------------------------

def test_record_anchors_keeps_every_query_of_a_small_stream(model):
    x = blocks(2)
    model.train()
    n = record_anchors(model, x)
    assert model.training and all(l._recording is None for l in model.peer_layers().values())
    assert n == 2 * L * 2  # blocks x tokens x heads: fewer than ANCHORS_PER_STREAM, so all of them
    for name, q in queries_of(model, x).items():
        a = model.peer_layers()[name].anchors
        assert a.shape == (n, 16) and a.dtype == torch.float32
        assert torch.equal(a[a[:, 0].argsort()], q[q[:, 0].argsort()])  # the same rows, in another order


def test_record_anchors_samples_per_stream_and_caps_by_subsampling_older_ones(model):
    x, y = blocks(2, seed=0), blocks(2, seed=1)
    assert record_anchors(model, x, per_stream=10, seed=0) == 10
    first = {n: l.anchors.clone() for n, l in model.peer_layers().items()}
    qx, qy = queries_of(model, x), queries_of(model, y)
    for name, a in first.items():
        assert all(bool((qx[name] == row).all(1).any()) for row in a)  # a sample of x's queries
    again = copy.deepcopy(model)
    assert record_anchors(again, x, per_stream=10, seed=0) == 20
    assert record_anchors(model, y, per_stream=10, seed=1, cap=15) == 15
    for name, layer in model.peer_layers().items():
        a = layer.anchors
        assert a.shape == (15, 16)
        kept, new = a[:5], a[5:]  # older anchors subsampled to cap - per_stream, then the new stream's
        assert all(bool((first[name] == row).all(1).any()) for row in kept)
        assert len({tuple(r.tolist()) for r in kept}) == 5
        assert all(bool((qy[name] == row).all(1).any()) for row in new)
    other = copy.deepcopy(again)
    record_anchors(other, y, per_stream=10, seed=2, cap=15)
    assert not all(torch.equal(other.peer_layers()[n].anchors, l.anchors) for n, l in model.peer_layers().items())


def test_record_anchors_never_exceeds_the_cap(model):
    assert record_anchors(model, blocks(2), per_stream=20, cap=15) <= 15


def test_anchors_survive_commit_and_checkout_bit_identically(tmp_path, tiny_config):
    store, _ = init_store(str(tmp_path / "s"), tiny_config(block_size=L, peer_layers=[0, 1]))
    m, origin = checkout_model(store, device="cpu")
    assert all(l.anchors.shape == (0, 16) for l in m.peer_layers().values())  # a fresh store has none
    record_anchors(m, blocks(3), per_stream=40)
    v = commit_model(store, m, origin=origin, message="anchors").version
    again, _ = checkout_model(store, v.id, device="cpu")
    for name, layer in m.peer_layers().items():
        got = again.peer_layers()[name].anchors
        assert got.shape == (40, 16) and torch.equal(got, layer.anchors)
    empty, _ = checkout_model(store, 1, device="cpu")
    assert all(l.anchors.shape == (0, 16) for l in empty.peer_layers().values())


def test_a_version_made_before_anchors_checks_out_and_grows_without_isolation(tmp_path, tiny_config, monkeypatch):
    store, _ = init_store(str(tmp_path / "s"), tiny_config(block_size=L, peer_layers=[0, 1]))
    m, origin = checkout_model(store, device="cpu")
    record_anchors(m, blocks(2))
    dense = m.dense_state_dict
    monkeypatch.setattr(m, "dense_state_dict", lambda: {k: v for k, v in dense().items() if not k.endswith(".anchors")})
    v = commit_model(store, m, origin=origin, message="as an older version").version
    assert not any(k.endswith(".anchors") for k in store.load_dense(v.id))
    old, _ = checkout_model(store, v.id, device="cpu")
    assert all(l.anchors.shape == (0, 16) for l in old.peer_layers().values())
    growth = apply_policy(old, CycleConfig(policy="freeze-all", grow_rows=GROW), blocks(2, seed=1))
    assert growth.isolation is None and growth.after_step is None
    assert growth.info == {"grown_rows": GROW, "routing_isolation": False}
    assert all(l.n_rows == 8 + GROW for l in old.peer_layers().values())


# -- the bounds and the projection ---------------------------------------------------------

def test_project_keeps_new_rows_out_of_every_anchors_topk_also_while_training(model):
    make_well_posed(model)
    x = blocks(2)
    record_anchors(model, x)
    control = copy.deepcopy(model)
    grow_at_anchors(control)
    assert min(new_ids_in_topk(control).values()) > 0  # unprotected: new experts enter anchors' top-k

    for layer in model.peer_layers().values():
        layer.freeze()
    iso = RoutingIsolation.before_growth(model, 0.1)
    assert iso is not None and set(iso.layers) == set(model.peer_layers())
    assert all(bool((a > 0).all()) for a in iso.allowed.values())  # well-posed
    grow_at_anchors(model)
    for name, layer in model.peer_layers().items():
        assert torch.equal(layer.row_keys, control.peer_layers()[name].row_keys)
    assert iso.violations() > 0
    assert iso.project() == 2 * GROW  # every new key had to move
    assert new_ids_in_topk(model) == {n: 0 for n in model.peer_layers()}

    freeze_all_but_new_rows(model)
    keys = [l.row_keys.detach().clone() for l in model.peer_layers().values()]
    # Other text reaches the new rows and trains their keys; the projection after every step
    # keeps them out of the anchors' top-k whatever that training asks for.
    train_steps(model, np.concatenate([x, blocks(6, seed=7)]), 6, after_step=iso.project)
    assert any(not torch.equal(k, l.row_keys) for k, l in zip(keys, model.peer_layers().values()))  # they did train
    assert new_ids_in_topk(model) == {n: 0 for n in model.peer_layers()}


def test_bounds_come_from_the_frozen_keys_and_skip_layers_without_anchors(model):
    assert RoutingIsolation.before_growth(model, 0.1) is None  # no anchors anywhere
    x = blocks(1)
    record_anchors(model, x)
    model.peer_layers()["blocks.1.ffn"].anchors = model.peer_layers()["blocks.1.ffn"].anchors[:0]
    loose = RoutingIsolation.before_growth(model, 0.0)
    tight = RoutingIsolation.before_growth(model, 0.5)
    assert set(loose.layers) == {"blocks.0.ffn"}
    layer = model.peer_layers()["blocks.0.ffn"]
    q = layer.anchors
    scores, _ = product_key_topk(q, layer.all_row_keys().detach(), layer.col_keys.detach(), layer.config.top_k)
    expected = scores[:, -1] - (q.chunk(2, -1)[1] @ layer.col_keys.detach().t()).amax(-1)
    torch.testing.assert_close(loose.allowed["blocks.0.ffn"], expected)
    torch.testing.assert_close(tight.allowed["blocks.0.ffn"], expected - 0.5 * expected.abs())
    torch.testing.assert_close(loose.q1["blocks.0.ffn"], q.chunk(2, -1)[0])


def test_freeze_all_with_isolation_leaves_the_anchor_text_outputs_unchanged(model):
    make_well_posed(model)
    x = blocks(1)  # 16 tokens x 2 heads: all of its queries become anchors
    record_anchors(model, x)
    before = logits(model, x)
    new = np.concatenate([x, blocks(7, seed=3)])  # the new stream overlaps the anchor text
    outs = {}
    for isolation in (True, False):
        m = copy.deepcopy(model)
        torch.manual_seed(0)
        growth = apply_policy(m, CycleConfig(policy="freeze-all", grow_rows=GROW, routing_isolation=isolation), new)
        assert growth.info["routing_isolation"] is isolation and (growth.after_step is not None) is isolation
        if isolation:
            assert growth.info["isolation_keys_moved_at_growth"] > 0
        train_steps(m, new, 5, after_step=growth.after_step)
        outs[isolation] = logits(m, x)
        hits = new_ids_in_topk(m)
        assert (max(hits.values()) == 0) if isolation else (max(hits.values()) > 0), hits
    torch.testing.assert_close(outs[True], before, rtol=1e-5, atol=1e-5)
    assert (outs[False] - before).abs().max() > 1e-3


# -- violations() == 0 after project(): not yet ------------------------------------------

def grown_with_bounds(model: PEERLM, x: np.ndarray) -> RoutingIsolation:
    record_anchors(model, x)
    for layer in model.peer_layers().values():
        layer.freeze()
    iso = RoutingIsolation.before_growth(model, 0.1)
    grow_at_anchors(model)
    return iso


def test_project_reaches_zero_violations_on_a_well_posed_model(model):
    iso = grown_with_bounds(make_well_posed(model), blocks(2))
    assert all(bool((a > 0).all()) for a in iso.allowed.values())
    iso.project()
    assert iso.violations() == 0
    assert iso.project() == 0  # nothing left to move


def test_project_reaches_zero_violations_when_some_bounds_are_negative(model):
    iso = grown_with_bounds(model, blocks(1))
    assert any(bool((a < 0).any()) for a in iso.allowed.values())  # the case this test is about
    iso.project()
    assert new_ids_in_topk(model) == {n: 0 for n in model.peer_layers()}
    assert iso.violations() == 0


# -- routing_retention and experts_when_trained --------------------------------------------

def test_routing_retention_is_the_weight_share_on_experts_that_existed_then():
    usage = {"l0": torch.tensor([1.0, 1.0, 2.0, 0.0], dtype=torch.float64), "l1": torch.tensor([0.5, 0.5, 0.0, 4.0])}
    assert routing_retention(usage, {"l0": 4, "l1": 4}) == pytest.approx(1.0)
    assert routing_retention(usage, {"l0": 2, "l1": 2}) == pytest.approx(3.0 / 9.0)
    assert routing_retention(usage, {"l0": 0, "l1": 0}) == 0.0
    assert routing_retention(usage, {"l0": 2}) == pytest.approx(7.0 / 9.0)  # a layer not listed: all its experts count
    assert routing_retention({"l0": torch.zeros(4)}, {"l0": 2}) is None  # no weight at all
    assert routing_retention({}, {"l0": 2}) is None


def version(stream: str | None, rows: dict[str, int], cols: int | None = 8) -> SimpleNamespace:
    model = {"peer": {"n_cols": cols}} if cols is not None else {}
    return SimpleNamespace(metrics={"stream": stream} if stream else {},
                           config={"model": model, "layers": {n: {"n_rows": r} for n, r in rows.items()}})


def test_experts_when_trained_reads_the_last_version_that_trained_the_stream():
    chain = [version(None, {"l0": 8}), version("a", {"l0": 8, "l1": 8}), version("b", {"l0": 10, "l1": 10}),
             version("a", {"l0": 12, "l1": 12}), version("c", {"l0": 14, "l1": 14})]
    assert experts_when_trained(chain, "a") == {"l0": 96, "l1": 96}  # the later of a's two versions
    assert experts_when_trained(chain, "b") == {"l0": 80, "l1": 80}
    assert experts_when_trained(chain[:3], "a") == {"l0": 64, "l1": 64}
    assert experts_when_trained(chain, "d") is None  # never trained
    assert experts_when_trained([version("a", {}, cols=None)], "a") is None  # a model without PEER layers
