"""PEERLayer.record and recording(): what is recorded, only inside, nesting, several layers."""

from __future__ import annotations

import pytest
import torch

from lifelong.config import PEERConfig
from lifelong.peer import PEERLayer, recording

D, HEADS, TOP_K, D_KEY = 16, 2, 4, 8


def make_layer(score: str = "softmax", seed: int = 0) -> PEERLayer:
    torch.manual_seed(seed)
    cfg = PEERConfig(d_model=D, heads=HEADS, top_k=TOP_K, d_key=D_KEY, n_rows=6, n_cols=5, score=score)
    return PEERLayer(cfg).eval()


def inputs(t: int, seed: int) -> torch.Tensor:
    return torch.randn(t, D, generator=torch.Generator().manual_seed(seed))


def usage_of(layer: PEERLayer, x: torch.Tensor) -> torch.Tensor:
    """Router weight per expert, computed directly: (N,) float64."""
    with torch.no_grad():
        scores, ids = layer.retrieve(layer.queries(x))
    g = scores.softmax(-1) if layer.config.score == "softmax" else scores.sigmoid()
    return torch.zeros(layer.num_experts, dtype=torch.float64).index_add_(0, ids.reshape(-1), g.reshape(-1).double())


def test_queries_are_recorded_only_inside():
    layer = make_layer()
    x1, x2, x3 = inputs(7, 1), inputs(3, 2), inputs(5, 3)
    layer(x1)
    with layer.record(queries=True) as rec:
        assert rec.usage is None and rec.queries == []
        layer(x2)
        layer(x3.view(1, 5, D))  # any leading shape: tokens are flattened
    layer(x1)
    assert len(rec.queries) == 2
    assert rec.queries[0].shape == (3, HEADS, D_KEY) and rec.queries[1].shape == (5, HEADS, D_KEY)
    with torch.no_grad():
        torch.testing.assert_close(rec.queries[0], layer.queries(x2))  # after the BatchNorm
    assert not rec.queries[0].requires_grad
    assert layer._recording is None


def test_usage_is_the_router_weight_per_expert_sized_on_entry():
    for score in ("softmax", "sigmoid"):
        layer = make_layer(score)
        x1, x2 = inputs(9, 1), inputs(4, 2)
        with layer.record(usage=True) as rec:
            assert rec.usage.shape == (layer.num_experts,) and rec.usage.dtype == torch.float64
            assert rec.queries is None
            layer(x1)
            layer(x2)
        torch.testing.assert_close(rec.usage, usage_of(layer, x1) + usage_of(layer, x2))
        if score == "softmax":
            assert float(rec.usage.sum()) == pytest.approx(13 * HEADS)
    layer = make_layer()
    layer.freeze()
    layer.grow(2)
    with layer.record(usage=True) as rec:
        layer(inputs(4, 5))
    assert rec.usage.shape == (8 * 5,)  # the grown grid
    # Growth inside a recording: the new experts are not counted, nothing breaks.
    with layer.record(usage=True) as rec:
        layer.grow(4)
        with torch.no_grad():
            layer.row_keys[-4:] *= 50  # the new rows win every query
        layer(inputs(4, 6))
    assert rec.usage.shape == (8 * 5,) and float(rec.usage.sum()) < 4 * HEADS


def test_nested_recordings_restore_the_outer_one():
    layer = make_layer()
    x1, x2, x3 = inputs(6, 1), inputs(4, 2), inputs(5, 3)
    with layer.record(usage=True, queries=True) as outer:
        layer(x1)
        with layer.record(queries=True) as inner:
            assert layer._recording is inner
            layer(x2)
        assert layer._recording is outer
        layer(x3)
    assert layer._recording is None
    assert [q.shape[0] for q in inner.queries] == [4]
    assert [q.shape[0] for q in outer.queries] == [6, 5]  # x2 went to the inner recording only
    torch.testing.assert_close(outer.usage, usage_of(layer, x1) + usage_of(layer, x3))


def test_recording_ends_when_the_block_raises():
    layer = make_layer()
    with layer.record(usage=True) as outer:
        with pytest.raises(RuntimeError):
            with layer.record(queries=True):
                raise RuntimeError("forward failed")
        assert layer._recording is outer
    assert layer._recording is None


def test_recording_several_layers_and_training_mode():
    layers = {"a": make_layer(seed=0), "b": make_layer(seed=1)}
    x = inputs(5, 1)
    with recording(layers, queries=True, usage=True) as recs:
        assert set(recs) == {"a", "b"} and all(layers[n]._recording is recs[n] for n in recs)
        layers["a"].train()
        layers["a"](x).sum().backward()  # recorded in training mode and with grad, too
        layers["b"](x)
    assert all(layer._recording is None for layer in layers.values())
    assert len(recs["a"].queries) == len(recs["b"].queries) == 1
    assert float(recs["a"].usage.sum()) == pytest.approx(5 * HEADS)
    torch.testing.assert_close(recs["b"].usage, usage_of(layers["b"], x))
    with pytest.raises(KeyError):
        with recording(layers, usage=True):
            raise KeyError("x")
    assert all(layer._recording is None for layer in layers.values())
