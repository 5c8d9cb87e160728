"""Evaluation: held-out blocks from a real registry, the loss (eval mode, padding), the loss
matrix with forgetting and transfer on hand-made chains, stream order, expert usage."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sqlalchemy import create_engine

from lifelong.errors import DataError
from lifelong.evaluate import (
    LossMatrix,
    continual_metrics,
    evaluate_loss,
    expert_usage,
    heldout_blocks,
    loss_matrix,
    stream_order,
)
from lifelong.model import PEERLM
from streams import StreamRegistry, pack_blocks

L = 16
PAD = 257


@pytest.fixture
def model(tiny_model) -> PEERLM:
    return tiny_model(block_size=L, peer_layers=[0, 1])


def token_blocks(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, L + 1)).astype(np.int64)


# ----------------------------------------------------------------------- held-out blocks
@pytest.fixture
def registry(tmp_path: Path) -> StreamRegistry:
    """Streams a, b (ingested: held-out documents exist) and c (registered, never read)."""
    reg = StreamRegistry(create_engine(f"sqlite:///{tmp_path / 'streams.db'}"), work_dir=str(tmp_path))
    texts = {
        "a": [f"apple banana cherry number {i}" for i in range(40)],
        "b": [f"{i} + {3 * i} = {4 * i}" for i in range(40)],
        "c": ["never ingested"],
    }
    for name, lines in texts.items():
        (tmp_path / f"{name}.txt").write_text("\n".join(lines) + "\n")
        reg.add(name, str(tmp_path / f"{name}.txt"), holdout=0.5)
    reg.ingest("a")
    reg.ingest("b")
    return reg


def test_heldout_blocks_of_one_stream_are_its_held_out_text_in_order(registry):
    tokens = registry.heldout("a").tokens
    assert tokens.size > 4 * L  # several blocks
    blocks = heldout_blocks(registry, "a", L, PAD, max_tokens=100_000)
    assert blocks.dtype == np.int64
    assert blocks.shape == (math.ceil((len(tokens) - 1) / L), L + 1)
    assert np.array_equal(blocks[0], tokens[: L + 1])  # not shuffled: a stable prefix first
    assert np.array_equal(blocks[1], tokens[L : 2 * L + 1])  # blocks overlap by one token
    assert np.array_equal(blocks, pack_blocks(tokens, L, pad_id=PAD, seed=None))
    small = heldout_blocks(registry, "a", L, PAD, max_tokens=3 * L)
    assert 0 < len(small) <= 3 and np.array_equal(small[0], blocks[0])


def test_heldout_blocks_of_several_streams_are_concatenated_and_padded_per_stream(registry):
    a = heldout_blocks(registry, "a", L, PAD, max_tokens=100_000)
    b = heldout_blocks(registry, "b", L, PAD, max_tokens=100_000)
    both = heldout_blocks(registry, ["a", "b"], L, PAD, max_tokens=100_000)
    assert np.array_equal(both, np.concatenate([a, b]))
    assert both.shape == (len(a) + len(b), L + 1)
    tail = len(registry.heldout("a").tokens) - 1 - (len(a) - 1) * L  # real targets in a's last block
    assert 0 < tail < L  # this text leaves a partial last block...
    assert (both[len(a) - 1, tail + 1 :] == PAD).all()  # ...padded, not filled from b
    assert np.array_equal(both[len(a) - 1, : tail + 1], registry.heldout("a").tokens[-(tail + 1) :])


@pytest.mark.parametrize("streams", ["c", ["c"], []])
def test_heldout_blocks_empty(registry, streams):
    blocks = heldout_blocks(registry, streams, L, PAD, max_tokens=1000)
    assert blocks.shape == (0, L + 1) and blocks.dtype == np.int64


# ------------------------------------------------------------------------ evaluate_loss
def test_evaluate_loss_runs_in_eval_mode_and_restores_the_mode(model):
    modes = []
    model.blocks[0].ffn.register_forward_hook(lambda m, i, o: modes.append((m.training, m.query_norm.training)))
    model.train()
    evaluate_loss(model, token_blocks(3), batch_size=2)
    assert modes == [(False, False)] * 2 and model.training and model.blocks[0].ffn.query_norm.training
    model.eval()
    evaluate_loss(model, token_blocks(3))
    assert not model.training
    model.train()
    with pytest.raises(DataError):
        evaluate_loss(model, np.full((2, L + 1), PAD))
    assert model.training  # restored after an error too


def test_evaluate_loss_ignores_padding_and_weights_by_tokens(model):
    full = token_blocks(2)
    padded = full.copy()
    padded[0, L + 1 - 10 :] = PAD  # block 0: its last 10 targets are padding (6 real)
    model.eval()
    with torch.no_grad():
        logits, _ = model(torch.from_numpy(full[:, :-1]))  # causal: padding later changes nothing before
    targets = torch.from_numpy(full[:, 1:])
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none").view(2, L)
    expected = float(torch.cat([ce[0, : L - 10], ce[1]]).mean())  # 6 + 16 real targets
    model.train()
    assert evaluate_loss(model, padded, batch_size=2) == pytest.approx(expected, rel=1e-5)
    assert evaluate_loss(model, padded, batch_size=1) == pytest.approx(expected, rel=1e-5)  # not a mean of batch means
    assert evaluate_loss(model, padded, batch_size=1, max_batches=1) == pytest.approx(float(ce[0, : L - 10].mean()), rel=1e-5)
    only_pad = np.vstack([padded, np.full((1, L + 1), PAD)])
    assert evaluate_loss(model, only_pad, batch_size=1) == pytest.approx(expected, rel=1e-5)  # an all-pad batch is skipped


def test_evaluate_loss_without_anything_to_score(model):
    with pytest.raises(DataError, match="no evaluation blocks"):
        evaluate_loss(model, np.zeros((0, L + 1), dtype=np.int64))
    with pytest.raises(DataError, match="only padding"):
        evaluate_loss(model, np.full((3, L + 1), PAD))


# --------------------------------------------------------------------------- loss matrix
def version(id: int, **metrics) -> SimpleNamespace:
    return SimpleNamespace(id=id, metrics=metrics)


BASE = math.log(260)


@pytest.fixture
def chain() -> list[SimpleNamespace]:
    return [
        version(0),  # init: no losses, not a row
        version(1, stream="a", losses={"a": 2.0}, loss_before=5.0, baseline_loss=BASE),
        version(2, stream="b", losses={"a": 2.5, "b": 1.5}, loss_before=4.0, baseline_loss=BASE),
        version(3, stream="c", losses={"a": 1.8, "b": 2.0, "c": 1.0}, loss_before=3.0),
    ]


def test_loss_matrix_rows_columns_and_gaps(chain):
    m = loss_matrix(chain)
    assert m.versions == [1, 2, 3] and m.streams == ["a", "b", "c"] and m.trained == ["a", "b", "c"]
    assert m.values == [[2.0, None, None], [2.5, 1.5, None], [1.8, 2.0, 1.0]]
    assert m.column(1) == [1.5, 2.0]
    assert m.before == {"a": 5.0, "b": 4.0, "c": 3.0} and m.baseline == BASE
    table = m.format_table().splitlines()
    assert len(table) == 4 and "-" in table[1] and "1.800" in table[3]


def test_forgetting_backward_and_forward_transfer_by_hand(chain):
    m = loss_matrix(chain)
    forgetting = m.forgetting()
    assert set(forgetting) == {"a", "b"}  # c: trained by the last cycle, nothing to forget
    assert forgetting["a"] == pytest.approx(1.8 - 2.0)  # against its best earlier loss, not the latest
    assert forgetting["b"] == pytest.approx(2.0 - 1.5)
    assert m.backward_transfer() == pytest.approx(((2.0 - 1.8) + (1.5 - 2.0)) / 2)
    assert m.forward_transfer() == pytest.approx(np.mean([BASE - 5.0, BASE - 4.0, BASE - 3.0]))
    summary = continual_metrics(m)
    assert summary["mean_heldout_loss"] == pytest.approx((1.8 + 2.0 + 1.0) / 3)
    assert summary["mean_forgetting"] == pytest.approx((-0.2 + 0.5) / 2)
    data = json.loads(json.dumps(m.to_dict()))
    assert data["forgetting"] == pytest.approx(forgetting) and data["values"][0] == [2.0, None, None]


def test_transfer_uses_the_latest_training_and_the_first_loss_before(chain):
    chain.append(version(4, stream="a", losses={"a": 1.2, "b": 2.4, "c": 1.1}, loss_before=1.9))  # a again
    m = loss_matrix(chain)
    assert m.before["a"] == 5.0  # B_j: before the *first* cycle that trained j
    assert m.forgetting() == pytest.approx({"b": 2.4 - 1.5, "c": 1.1 - 1.0})  # a is the stream just trained
    # BWT against the last cycle that trained each stream: a (cycle 4 itself), b, c
    assert m.backward_transfer() == pytest.approx(np.mean([0.0, 1.5 - 2.4, 1.0 - 1.1]))


def test_degenerate_matrices():
    one = loss_matrix([version(1, stream="a", losses={"a": 2.0})])
    assert one.forgetting() == {} and one.backward_transfer() is None and one.forward_transfer() is None
    empty = LossMatrix(versions=[], streams=[], trained=[], values=[])
    assert continual_metrics(empty)["mean_heldout_loss"] is None  # never NaN in stored metrics
    no_base = loss_matrix([version(1, stream="a", losses={"a": 2.0}, loss_before=3.0)])
    assert no_base.before == {"a": 3.0} and no_base.forward_transfer() is None


def test_stream_order(chain):
    assert stream_order(chain, {}, "d") == ["a", "b", "c", "d"]
    assert stream_order(chain, {"e": {}, "b": {}}, "b") == ["a", "b", "c", "e"]
    assert stream_order([version(0)], {"x": {}, "y": {}}, "z") == ["x", "y", "z"]
    assert stream_order([], {}, "a") == ["a"]


# -------------------------------------------------------------------------- expert usage
def test_expert_usage_counts_router_weight_and_leaves_no_recording(model):
    counts: dict[str, torch.Tensor] = {}
    layers = model.peer_layers()
    usage = expert_usage(model, token_blocks(6), batch_size=2, max_batches=2, counts=counts)
    heads = model.config.peer.heads
    assert set(usage) == set(counts) == set(layers) == {"blocks.0.ffn", "blocks.1.ffn"}
    for name, layer in layers.items():
        u = counts[name]
        assert u.shape == (layer.num_experts,) and u.dtype == torch.float64
        assert float(u.sum()) == pytest.approx(2 * 2 * L * heads)  # 2 batches of 2 blocks; softmax sums to 1 per head
        stats = usage[name]
        assert 0 < stats["used_share"] <= 1 and stats["used_share"] == pytest.approx(float((u > 0).double().mean()))
        assert stats["experts"] == layer.num_experts and stats["kl_uniform"] >= 0
        assert layer._recording is None
    assert model.training
