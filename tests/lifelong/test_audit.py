"""Retrieval audit: FAISS exact top-k agrees with product keys; broken routers and ties."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lifelong import LifelongError, PEERConfig, PEERLayer, PEERLM, TrainConfig, product_key_topk, random_batches, train
from lifelong.audit_exact import audit_layer, audit_model, capture_queries, compare_topk, exact_topk, router_usage
from lifelong.audit_report import AuditError, AuditReport, NoPEERLayersError, NoQueriesError


@pytest.fixture
def tiny_model(tiny_config):
    """A factory: the tiny model, seeded, with PEER in ``peer_layers`` and any grid shape.

    block_size 16: ``blocks()`` rows are 17 tokens, the training layout the audit cuts to 16."""

    def build(peer_layers=(1,), seed=0, **overrides) -> PEERLM:
        torch.manual_seed(seed)
        return PEERLM(tiny_config(**{"block_size": 16, "peer_layers": list(peer_layers), **overrides}))

    return build


def blocks(n=12, length=17, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, length))


def layer_queries(layer: PEERLayer, n=300, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    layer.eval()
    with torch.no_grad():
        return layer.queries(torch.randn(n, layer.config.d_model, generator=g))  # (n, h, dk)


def assert_exact(report_or_layer):
    stats = report_or_layer.total
    assert stats.recall_up_to_ties == 1.0
    assert stats.missed_ids == 0 and stats.duplicate_ids == 0
    assert stats.recall >= 0.99  # raw: only float ties may differ
    assert stats.max_score_diff < 1e-4


# ------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("n_rows,n_cols", [(8, 8), (5, 12), (13, 6)])
def test_fresh_model_recall_is_one_square_and_rectangular(n_rows, n_cols, tiny_model):
    model = tiny_model(n_rows=n_rows, n_cols=n_cols, peer_layers=(0, 1))
    report = audit_model(model, blocks(), batch_size=4, progress=False)
    assert set(report.layers) == {"blocks.0.ffn", "blocks.1.ffn"}
    for audit in report.layers.values():
        assert_exact(audit)
        assert audit.tokens == 12 * 16 and audit.total.queries == 12 * 16 * 2
        assert len(audit.per_head) == 2 and all(h.recall_up_to_ties == 1.0 for h in audit.per_head)
        assert audit.num_experts == n_rows * n_cols
    assert report.passed() and report.min_recall == 1.0


def test_trained_and_grown_model_recall_is_one(tiny_model):
    model = tiny_model(n_rows=6, n_cols=10)
    data = blocks(32, 17, seed=1)
    train(model, random_batches(data, 4, seed=0), TrainConfig(steps=4, batch_size=4, warmup_steps=1), progress=False)
    assert_exact(audit_model(model, data[:8], progress=False))
    layer = model.peer_layers()["blocks.1.ffn"]
    layer.freeze()
    layer.grow(3)
    layer.grow(2)
    assert layer.n_rows == 11
    train(model, random_batches(data, 4, seed=1), TrainConfig(steps=3, batch_size=4, warmup_steps=1), progress=False)
    report = audit_model(model, data[:8], progress=False)
    assert_exact(report)
    assert report.layers["blocks.1.ffn"].num_experts == 11 * 10


def test_capture_restores_state_and_respects_max_queries(tiny_model):
    model = tiny_model()
    model.train()
    model.blocks[0].attn.eval()  # a mixed-mode model must come back mixed
    layer = model.peer_layers()["blocks.1.ffn"]
    captured = capture_queries(model, torch.as_tensor(blocks(5, 16)), batch_size=2, max_queries=40)
    q = captured["blocks.1.ffn"]
    assert q.shape == (40, 2, 16) and q.device.type == "cpu"
    assert model.training and layer.training and layer._recording is None
    assert not model.blocks[0].attn.training and model.blocks[0].training
    # Same queries as the layer computes in eval mode on the same inputs.
    model.eval()
    with torch.no_grad():
        x = model.embed(torch.as_tensor(blocks(5, 16))[:1]) + model.pos(torch.arange(16))
        x = model.blocks[0](x)
        x = model.blocks[1].norm2(x + model.blocks[1].attn(model.blocks[1].norm1(x)))
        torch.testing.assert_close(layer.queries(x.reshape(-1, model.config.d_model)), q[:16])


# ---------------------------------------------------------------------- exact search
def test_chunked_exact_topk_equals_unchunked_and_brute_force():
    torch.manual_seed(0)
    layer = PEERLayer(PEERConfig(d_model=16, heads=2, top_k=4, d_key=12, n_rows=11, n_cols=7)).eval()
    q = layer_queries(layer).reshape(-1, 12)  # (600, dk)
    ref_s, ref_i = (q @ layer.full_keys().t()).topk(8, dim=-1)
    whole_s, whole_i = exact_topk(layer, q, 8, chunk_rows=layer.n_rows)
    for rows in (1, 2, 3, 5):  # 1 row = 7 keys < k: exercises the padded merge
        s, i = exact_topk(layer, q, 8, chunk_rows=rows)
        assert torch.equal(i, whole_i), rows
        torch.testing.assert_close(s, whole_s)
    assert torch.equal(whole_i, ref_i)
    torch.testing.assert_close(whole_s, ref_s)


def test_exact_topk_errors():
    layer = PEERLayer(PEERConfig(d_model=16, heads=2, top_k=4, d_key=8, n_rows=4, n_cols=4))
    with pytest.raises(NoQueriesError):
        exact_topk(layer, torch.empty(0, 8), 4)
    with pytest.raises(AuditError, match="d_key=8"):
        exact_topk(layer, torch.randn(3, 6), 4)
    with pytest.raises(AuditError, match="k=17"):
        exact_topk(layer, torch.randn(3, 8), 17)
    if not torch.cuda.is_available():
        with pytest.raises(AuditError, match="use_gpu"):
            exact_topk(layer, torch.randn(3, 8), 4, use_gpu=True)


# ------------------------------------------------------------------ broken routers
def test_router_dropping_a_codebook_row_is_caught(monkeypatch):
    torch.manual_seed(0)
    layer = PEERLayer(PEERConfig(d_model=16, heads=2, top_k=4, d_key=8, n_rows=6, n_cols=6)).eval()
    q = layer_queries(layer, 400)

    def broken(q, candidates=None):  # never considers row 0 of C1
        scores, ids = product_key_topk(q, layer.all_row_keys()[1:], layer.col_keys, layer.config.top_k)
        return scores, ids + layer.n_cols

    monkeypatch.setattr(layer, "retrieve", broken)
    audit = audit_layer(layer, q)
    assert audit.total.recall < 1.0 and audit.total.recall_up_to_ties < 1.0
    assert audit.total.missed_ids > 0 and audit.total.missed_queries > 0
    assert audit.total.max_score_diff > 1e-3


def test_approximate_candidates_mode_is_caught(tiny_model):
    model = tiny_model(n_rows=16, n_cols=16)
    model.peer_layers()["blocks.1.ffn"].config.candidates = 2
    report = audit_model(model, blocks(), progress=False)
    audit = report.layers["blocks.1.ffn"]
    assert audit.candidates == 2
    assert audit.total.recall_up_to_ties < 1.0 and audit.total.missed_ids > 0
    assert not report.passed() and report.passed(threshold=0.0)
    assert "approximate (candidates=2)" in report.format_table()


def test_wrong_scores_with_right_ids_show_in_score_difference(monkeypatch):
    torch.manual_seed(0)
    layer = PEERLayer(PEERConfig(d_model=16, heads=2, top_k=4, d_key=8, n_rows=6, n_cols=6)).eval()
    original = layer.retrieve
    monkeypatch.setattr(layer, "retrieve", lambda q, candidates=None: (lambda s, i: (s * 1.01, i))(*original(q)))
    audit = audit_layer(layer, layer_queries(layer))
    assert audit.total.recall == 1.0
    assert audit.total.max_score_diff > 1e-3


# ----------------------------------------------------------------------------- ties
def tied_layer() -> PEERLayer:
    """Every row key equal: the n1 experts of a column score exactly the same."""
    torch.manual_seed(0)
    layer = PEERLayer(PEERConfig(d_model=16, heads=2, top_k=4, d_key=8, n_rows=8, n_cols=5)).eval()
    with torch.no_grad():
        layer.row_keys.copy_(layer.row_keys[:1].expand_as(layer.row_keys))
    return layer


def test_ties_are_not_false_alarms_with_the_real_router():
    layer = tied_layer()
    audit = audit_layer(layer, layer_queries(layer))
    assert audit.total.recall_up_to_ties == 1.0 and audit.total.missed_ids == 0


def test_ties_reported_separately_when_router_picks_other_tied_experts(monkeypatch):
    layer = tied_layer()
    n1, n2 = layer.n_rows, layer.n_cols
    original = layer.retrieve

    def rotated(q, candidates=None):  # same columns, rows + 1: equal scores, never the same id set
        scores, ids = original(q)
        rows, cols = ids // n2, ids % n2
        return scores, (rows + 1) % n1 * n2 + cols

    monkeypatch.setattr(layer, "retrieve", rotated)
    audit = audit_layer(layer, layer_queries(layer))
    assert audit.total.recall < 0.9  # raw recall sees different ids ...
    assert audit.total.tied_ids > 0 and audit.total.tie_matches > 0
    assert audit.total.missed_ids == 0 and audit.total.recall_up_to_ties == 1.0  # ... all ties
    assert audit.total.rank_agreement == 1.0  # tie-aware: equal scores at every rank
    assert audit.total.max_score_diff < 1e-5


def test_compare_topk_tie_rules_by_hand():
    """k = 2, one query, one head: which mismatches are ties and which are misses."""
    t = lambda *v: torch.tensor([[list(v)]])  # noqa: E731  (1, 1, k)
    exact_s, exact_i = t(10.0, 5.0), t(10, 20)
    # Router returns the equal-scoring expert 30 instead of 20: a tie.
    (st,) = compare_topk(t(10.0, 5.0), t(10, 30), exact_s, exact_i, t(10.0, 5.0).double())
    assert (st.hits, st.tied_ids, st.missed_ids, st.tie_matches, st.exact_matches) == (1, 1, 0, 1, 0)
    assert st.recall == 0.5 and st.recall_up_to_ties == 1.0 and st.rank_agreement == 1.0
    # It drops the clearly better expert 10 for a tied k-th-place one: a miss, though every
    # returned id scores >= the exact k-th score.
    (st,) = compare_topk(t(5.0, 5.0), t(20, 30), exact_s, exact_i, t(5.0, 5.0).double())
    assert (st.hits, st.tied_ids, st.missed_ids, st.tie_matches) == (1, 0, 1, 0)
    assert st.max_score_diff == 5.0
    # It claims score 5 for expert 30 whose true score is 4: a miss, not a tie.
    (st,) = compare_topk(t(10.0, 5.0), t(10, 30), exact_s, exact_i, t(10.0, 4.0).double())
    assert (st.tied_ids, st.missed_ids) == (0, 1) and st.rank_agreement == 0.5
    # Within the tolerance (1e-5 * max(1, 10)) is a tie; beyond it is not.
    (st,) = compare_topk(t(10.0, 5.0), t(10, 30), exact_s, exact_i, t(10.0, 5.0 - 5e-5).double())
    assert st.tied_ids == 1
    (st,) = compare_topk(t(10.0, 5.0), t(10, 30), exact_s, exact_i, t(10.0, 5.0 - 5e-4).double())
    assert st.missed_ids == 1
    # The same id twice is never a tie.
    (st,) = compare_topk(t(10.0, 10.0), t(10, 10), exact_s, exact_i, t(10.0, 10.0).double())
    assert st.duplicate_ids == 1 and st.missed_ids == 1


# ---------------------------------------------------------------------- usage, report
def test_usage_and_kl_to_uniform():
    ids = torch.arange(8).repeat(3)
    usage, used, kl = router_usage(ids, torch.ones(24), 8)
    assert (usage, used) == (1.0, 8) and kl == pytest.approx(0.0, abs=1e-12)
    usage, used, kl = router_usage(torch.zeros(5, dtype=torch.long), torch.ones(5), 8)
    assert (usage, used) == (1 / 8, 1) and kl == pytest.approx(np.log(8))
    _, _, kl = router_usage(torch.tensor([0, 1]), torch.tensor([3.0, 1.0]), 4)  # p = (3/4, 1/4, 0, 0)
    assert kl == pytest.approx(0.75 * np.log(0.75 * 4) + 0.25 * np.log(0.25 * 4))


def test_report_round_trips_through_json(tiny_model):
    report = audit_model(tiny_model(), blocks(4), progress=False, extra={"version": 3})
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert data["schema"] == 1 and data["extra"] == {"version": 3}
    layer = data["layers"]["blocks.1.ffn"]
    for key in ("recall", "recall_up_to_ties", "exact_match_share", "rank_agreement", "max_score_diff", "tied_ids", "missed_ids"):
        assert key in layer["total"] and key in layer["per_head"][0]
    for key in ("usage", "kl_uniform", "num_experts", "candidates", "backend", "tokens", "seconds_exact"):
        assert key in layer
    assert AuditReport.from_dict(data).to_dict() == data
    table = report.format_table()
    assert "blocks.1.ffn" in table and "PASS" in table


# --------------------------------------------------------------------------- errors
def test_clear_errors(tiny_model):
    dense = tiny_model(peer_layers=())
    with pytest.raises(NoPEERLayersError) as exc:
        audit_model(dense, blocks(), progress=False)
    assert isinstance(exc.value, LifelongError) and exc.value.hint
    model = tiny_model()
    with pytest.raises(NoQueriesError):
        audit_model(model, np.zeros((0, 16), dtype=np.int64), progress=False)
    with pytest.raises(NoQueriesError):
        capture_queries(model, blocks(), max_queries=0)
    with pytest.raises(AuditError, match="2-D"):
        capture_queries(model, np.zeros(16, dtype=np.int64))
    layer = model.peer_layers()["blocks.1.ffn"]
    with pytest.raises(NoQueriesError):
        audit_layer(layer, torch.empty(0, 2, 16))
    with pytest.raises(AuditError, match="heads=2"):
        audit_layer(layer, torch.randn(3, 4, 16))
