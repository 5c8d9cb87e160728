"""PEER layer: exact product-key retrieval, gradients against a float64 reference, freezing."""

from __future__ import annotations

import hashlib

import pytest
import torch
import torch.nn.functional as F

from lifelong import ConfigError, PEERConfig, PEERLayer, RowAdam, product_key_topk


def brute_topk(q, row_keys, col_keys, k):
    """Top-k over the materialised full keys [C1_i ; C2_j], ids i * n2 + j."""
    n1, n2 = row_keys.shape[0], col_keys.shape[0]
    full = torch.cat(
        [row_keys[:, None, :].expand(n1, n2, -1), col_keys[None, :, :].expand(n1, n2, -1)], dim=-1
    ).reshape(n1 * n2, -1)
    return (q @ full.t()).topk(k, dim=-1)


@pytest.mark.parametrize("n1,n2", [(8, 8), (32, 32), (5, 40), (40, 6), (33, 17)])
def test_product_key_topk_is_exact(n1, n2):
    for seed in range(12):
        g = torch.Generator().manual_seed(seed)
        dk = 2 * int(torch.randint(1, 12, (1,), generator=g))
        for k in sorted({1, 2, 5, 16, 32, min(n1, n2)}):
            if k > min(n1, n2):
                continue
            q = torch.randn(20, 3, dk, generator=g, dtype=torch.float64)
            c1 = torch.randn(n1, dk // 2, generator=g, dtype=torch.float64)
            c2 = torch.randn(n2, dk // 2, generator=g, dtype=torch.float64)
            scores, ids = product_key_topk(q, c1, c2, k)
            ref_scores, ref_ids = brute_topk(q, c1, c2, k)
            torch.testing.assert_close(scores, ref_scores, rtol=0, atol=1e-12)
            assert torch.equal(ids.sort(-1).values, ref_ids.sort(-1).values), (seed, k, n1, n2)


def test_float32_exact_up_to_ties():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(500, 8, 64, generator=g)
    c1, c2 = torch.randn(64, 32, generator=g), torch.randn(48, 32, generator=g)
    scores, ids = product_key_topk(q, c1, c2, 16)
    ref_scores, ref_ids = brute_topk(q, c1, c2, 16)
    torch.testing.assert_close(scores, ref_scores, rtol=1e-5, atol=1e-5)
    same = (ids.sort(-1).values == ref_ids.sort(-1).values).all(-1)
    # Any mismatch must be a float tie at the k-th score.
    gap = (scores[..., -1] - ref_scores[..., -1]).abs()
    assert bool((same | (gap < 1e-5)).all())
    assert same.float().mean() > 0.99


def test_exact_after_growth_and_on_layer():
    torch.manual_seed(0)
    layer = PEERLayer(PEERConfig(d_model=16, heads=2, top_k=8, d_key=12, n_rows=9, n_cols=11)).double()
    layer.freeze()
    layer.grow(5)
    layer.grow(3)
    assert layer.n_rows == 17 and layer.num_experts == 17 * 11
    q = torch.randn(64, 2, 12, dtype=torch.float64)
    scores, ids = layer.retrieve(q)
    ref_scores, ref_ids = brute_topk(q, layer.all_row_keys().detach(), layer.col_keys.detach(), 8)
    torch.testing.assert_close(scores, ref_scores)
    assert torch.equal(ids.sort(-1).values, ref_ids.sort(-1).values)
    # full_keys materialises the same grid, in id order
    full = layer.full_keys()
    assert full.shape == (17 * 11, 12)
    torch.testing.assert_close((q @ full.t()).topk(8).values, ref_scores)
    torch.testing.assert_close(layer.full_keys(9, 14), full[9 * 11 : 14 * 11])


def test_approximate_mode_loses_recall():
    torch.manual_seed(0)
    q = torch.randn(400, 64)
    c1, c2 = torch.randn(64, 32), torch.randn(64, 32)
    _, exact = product_key_topk(q, c1, c2, 16)
    _, approx = product_key_topk(q, c1, c2, 16, candidates=4)
    recall = (approx[:, :, None] == exact[:, None, :]).any(-1).float().mean()
    assert recall < 0.95


def reference_peer(layer: PEERLayer, x, u, v):
    """Straightforward PEER: brute-force top-k, gathered weights, float64."""
    c = layer.config
    q = layer.query_norm(layer.query(x)).view(-1, c.heads, c.d_key)
    row_keys = layer.all_row_keys()
    n1, n2 = row_keys.shape[0], layer.col_keys.shape[0]
    full = torch.cat([row_keys[:, None, :].expand(n1, n2, -1), layer.col_keys[None, :, :].expand(n1, n2, -1)], -1)
    scores, ids = (q @ full.reshape(n1 * n2, -1).t()).topk(c.top_k, dim=-1)  # (T, h, k)
    g = scores.softmax(-1) if c.score == "softmax" else scores.sigmoid()
    act = F.gelu if c.activation == "gelu" else F.relu
    hidden = act(torch.einsum("td,thkd->thk", x, u[ids]))
    return torch.einsum("thk,thkd->td", g * hidden, v[ids])


@pytest.mark.parametrize("score,activation", [("softmax", "gelu"), ("sigmoid", "relu")])
@pytest.mark.parametrize("grown", [False, True])
def test_forward_backward_match_reference(score, activation, grown):
    torch.manual_seed(3)
    cfg = PEERConfig(d_model=12, heads=3, top_k=4, d_key=8, n_rows=6, n_cols=7, score=score, activation=activation)
    layer = PEERLayer(cfg).double()
    if grown:
        layer.freeze()
        layer.grow(4)
    layer.train()
    x = torch.randn(10, 12, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    w = torch.randn_like(y)
    (y * w).sum().backward()
    popped = layer.grads.pop()

    # Reference on fresh leaves copied from the layer.
    ref_layer = PEERLayer(cfg).double()
    if grown:
        ref_layer.freeze()
        ref_layer.grow(4)
    ref_layer.load_state_dict(layer.state_dict())
    ref_layer.train()
    x2 = x.detach().clone().requires_grad_()
    u = layer.expert_u.detach().clone().requires_grad_()
    v = layer.expert_v.detach().clone().requires_grad_()
    y_ref = reference_peer(ref_layer, x2, u, v)
    (y_ref * w).sum().backward()

    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(layer.query.weight.grad, ref_layer.query.weight.grad)
    torch.testing.assert_close(layer.row_keys.grad, ref_layer.row_keys.grad)
    if not grown:
        torch.testing.assert_close(layer.col_keys.grad, ref_layer.col_keys.grad)
    else:
        assert layer.col_keys.grad is None  # frozen with the old experts
    start = layer.trainable_start
    gu = torch.zeros_like(u)
    gv = torch.zeros_like(v)
    if popped is not None:
        rows, pu, pv = popped
        assert bool((rows >= start).all())
        gu[rows], gv[rows] = pu, pv
    torch.testing.assert_close(gu[start:], u.grad[start:])
    torch.testing.assert_close(gv[start:], v.grad[start:])
    assert not gu[:start].any()  # frozen experts get no gradient at all


def test_no_gathered_weight_tensor_is_kept_for_backward():
    torch.manual_seed(0)
    cfg = PEERConfig(d_model=32, heads=4, top_k=8, d_key=16, n_rows=16, n_cols=16)
    layer = PEERLayer(cfg)
    x = torch.randn(64, 32, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    T, S, d = 64, 4 * 8, 32
    for shape in saved:
        n = 1
        for s in shape:
            n *= s
        assert shape[-1:] != (d,) or n in (T * d, layer.num_experts * d), f"saved a gathered tensor {shape}"
        assert n < T * S * d or n == layer.num_experts * d, f"saved a (T, h, k, d)-sized tensor {shape}"
    y.sum().backward()


def _digest(*tensors):
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def test_frozen_is_bit_identical_and_optimizer_touches_only_retrieved_rows():
    torch.manual_seed(0)
    layer = PEERLayer(PEERConfig(d_model=16, heads=2, top_k=4, d_key=8, n_rows=8, n_cols=8))
    layer.freeze()
    layer.grow(4)
    start = layer.trainable_start
    frozen_before = _digest(layer.expert_u[:start], layer.expert_v[:start], layer.frozen_row_keys, layer.col_keys)
    opt = RowAdam([layer], lr=0.05)
    for _ in range(5):
        x = torch.randn(32, 16)
        before_u = layer.expert_u.clone()
        q = layer.queries(x)
        _, ids = layer.retrieve(q)
        layer(x).pow(2).sum().backward()
        updated = opt.step()
        changed = (layer.expert_u != before_u).any(1).nonzero().squeeze(1)
        touched = set(ids.flatten().tolist())
        assert set(changed.tolist()) <= {i for i in touched if i >= start}
        assert updated == len({i for i in touched if i >= start})
    assert _digest(layer.expert_u[:start], layer.expert_v[:start], layer.frozen_row_keys, layer.col_keys) == frozen_before
    # Optimizer state only for the trainable rows.
    _, second, steps = opt.state[0]
    assert second.shape[0] == layer.num_experts - start == steps.shape[0]
    assert not layer.col_keys.requires_grad


def test_growth_keeps_ids_and_outputs_of_old_experts():
    torch.manual_seed(0)
    layer = PEERLayer(PEERConfig(d_model=16, heads=2, top_k=4, d_key=8, n_rows=6, n_cols=10)).eval()
    u0, v0 = layer.expert_u.clone(), layer.expert_v.clone()
    shard = layer.grow(3)
    assert (shard.row_start, shard.row_end) == (6, 9)
    assert torch.equal(layer.expert_u[:60], u0) and torch.equal(layer.expert_v[:60], v0)
    assert layer.num_experts == 90 and layer.config.n_rows == 9
    assert [(s.row_start, s.row_end) for s in layer.shards] == [(0, 6), (6, 9)]


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(d_key=7), "d_key"),
        (dict(top_k=20, n_rows=16, n_cols=64), "top_k"),
        (dict(top_k=20, n_rows=64, n_cols=16), "top_k"),
        (dict(score="relu"), "score"),
        (dict(heads=0), "heads"),
        (dict(candidates=1, top_k=4, n_rows=8, n_cols=8), "candidates"),
    ],
)
def test_invalid_config_names_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=f"'{field}'"):
        PEERConfig(**kwargs)


def test_bad_growth_and_input_are_clear_errors():
    layer = PEERLayer(PEERConfig(d_model=16, heads=2, top_k=4, d_key=8, n_rows=8, n_cols=8))
    with pytest.raises(ConfigError, match="'rows'"):
        layer.grow(0)
    with pytest.raises(ConfigError, match="'init_keys'"):
        layer.grow(2, init_keys=torch.zeros(3, 4))
    with pytest.raises(ValueError, match="d_model=16"):
        layer(torch.randn(4, 15))
