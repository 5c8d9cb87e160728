"""`run_cycle` through the Python API on a tiny model and three tiny streams.

Commit, policies (bit-identical freezing; a never-trained parent is trained in full first),
routing isolation's metrics, the forgetting guard (candidate ref), replay and distillation,
the lease and the optimizer state. SIGKILL of a cycle: test_cycle_crash.py.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from cycle_testlib import GROW, cfg, cycle, cycle_rows, experts_by_layer, old_tables_equal
from cycle_testlib import base, chain, after_a  # noqa: F401 (fixtures, requested by name)

from expert_store import ExpertStore
from lifelong.checkpoint import checkout_model, commit_model
from lifelong.cycle import NothingPendingError
from lifelong.records import Lease, LeaseHeldError


def test_cycle_commits_a_version_with_cursor_metrics_and_growth(chain, tiny_config):
    store, results, expected, _ = chain
    res = results["a"]
    assert res.accepted and res.ref == "HEAD" and res.parent == 1 and res.version == 2
    v = store.version(res.version)
    assert v.cursors["a"] == expected["a"].new_cursor  # the stream's cursor, committed in the version
    assert v.metrics["new_docs"] == expected["a"].train_docs > 0
    assert set(v.metrics["losses"]) == {"a"} and v.metrics["losses"]["a"] > 0
    for s, r in results.items():  # every version: one loss-matrix row over every stream seen
        assert list(store.version(r.version).metrics["losses"]) == list("abc"[: "abc".index(s) + 1])
    for s, r in results.items():  # the parent's loss on each new stream, before its cycle: forward transfer
        m = store.version(r.version).metrics
        assert m["loss_before"] > 0 and m["forward_transfer"] == pytest.approx(m["baseline_loss"] - (
            sum(store.version(results[x].version).metrics["loss_before"] for x in "abc"[: "abc".index(s) + 1]) / ("abc".index(s) + 1)))
    b = store.version(results["b"].version)  # the first growth: the second cycle
    assert b.parent == v.id and b.metrics["policy"] == "freeze-experts" and b.metrics["grown_rows"] == GROW
    assert experts_by_layer(b) == {k: n + GROW * tiny_config().peer.n_cols for k, n in experts_by_layer(v).items()}
    assert [r.status for r in cycle_rows(store)] == ["committed"] * 3
    head = store.head()
    with pytest.raises(NothingPendingError):
        cycle(store, "a")  # nothing new since HEAD's cursor
    assert store.head() == head and len(store.versions()) == 4
    assert len(cycle_rows(store)) == 3  # no cycle row either: refused before it started


def test_an_untrained_parent_is_trained_in_full_whatever_policy_was_asked(chain, tiny_config):
    store, results, _, logs = chain
    res = results["a"]  # freeze-experts was asked, on the never-trained base version 1
    assert res.policy == "full" and res.metrics["policy"] == "full" and res.metrics["grown_rows"] == 0
    v = store.version(res.version)
    assert v.metrics["policy"] == "full" and v.config["run"]["cycle"]["policy"] == "full"  # committed as what ran
    assert experts_by_layer(v) == experts_by_layer(store.version(1))  # nothing grown
    assert all(s.row_end <= tiny_config().peer.n_rows for s in v.shards) and not any(s.frozen for s in v.shards)
    assert any("version 1 has never been trained: this cycle trains it in full" in line and "freeze-experts" in line
               for line in logs["a"])
    assert "routing_isolation" not in res.metrics  # nothing grew: nothing to isolate
    assert res.metrics["anchors"] > 0  # but its queries are kept for the growths to come
    pm, _ = checkout_model(store, 1, device="cpu")
    cm, _ = checkout_model(store, res.version, device="cpu")
    for name, old in pm.peer_layers().items():  # the old experts trained
        assert not torch.equal(old.expert_u, cm.peer_layers()[name].expert_u)
    # A trained parent is not overridden: the next cycle grew as asked, and logged no override.
    assert results["b"].policy == "freeze-experts" and results["b"].metrics["grown_rows"] == GROW
    assert not any("never been trained" in line for line in logs["b"] + logs["c"])


def test_freeze_experts_keeps_old_experts_and_keys_bit_identical(chain):
    store, results, _, _ = chain
    parent, child = store.version(results["a"].version), store.version(results["b"].version)
    old = {(s.layer, s.row_start, s.row_end): s.object_hash for s in parent.shards}
    new = {(s.layer, s.row_start, s.row_end): s.object_hash for s in child.shards}
    assert all(new[k] == h for k, h in old.items())  # same content hash: same bytes
    pm, _ = checkout_model(store, parent.id, device="cpu")
    cm, _ = checkout_model(store, child.id, device="cpu")
    assert old_tables_equal(pm, cm)
    assert any(not torch.equal(a, cm.dense_state_dict()[k]) for k, a in pm.dense_state_dict().items())  # dense trained


RECORDED = (".anchors", ".background", ".background_docs")  # what a cycle records in the dense object, not weights


def test_freeze_all_keeps_every_old_weight_bit_identical(chain, tiny_config):
    store, results, _, _ = chain
    pm, _ = checkout_model(store, results["b"].version, device="cpu")
    cm, _ = checkout_model(store, results["c"].version, device="cpu")
    assert old_tables_equal(pm, cm)
    pd, cd = pm.dense_state_dict(), cm.dense_state_dict()
    assert pd.keys() == cd.keys() and any("running_mean" in k for k in pd)  # BatchNorm statistics included
    changed = [k for k in pd if not torch.equal(pd[k], cd[k])]
    assert changed and all(k.endswith(RECORDED) for k in changed)
    assert [k for k in changed if k.endswith(".anchors")] == [f"{n}.anchors" for n in pm.peer_layers()]
    for name, old in pm.peer_layers().items():  # c's queries were added; every earlier anchor kept (in another order)
        new = cm.peer_layers()[name].anchors
        assert new.shape[0] > old.anchors.shape[0] > 0
        assert {r.tobytes() for r in old.anchors.numpy()} <= {r.tobytes() for r in new.numpy()}
    grown = experts_by_layer(store.version(results["c"].version))
    assert grown == {k: n + GROW * tiny_config().peer.n_cols for k, n in experts_by_layer(store.version(results["b"].version)).items()}


def test_growth_on_a_trained_parent_is_routing_isolated(chain):
    store, results, _, logs = chain
    m = results["c"].metrics  # freeze-all on b's version, which holds a's and b's anchors
    assert m["policy"] == "freeze-all" and m["routing_isolation"] is True
    assert isinstance(m["isolation_keys_moved_at_growth"], int) and m["isolation_keys_moved_at_growth"] >= 0
    assert isinstance(m["isolation_violations"], int) and m["isolation_violations"] >= 0
    assert m["anchors"] > results["b"].metrics["anchors"] > results["a"].metrics["anchors"] > 0
    assert set(m["routing_retention"]) == {"a", "b"}  # each earlier stream, never the one being trained
    assert all(0.0 <= r <= 1.0 for r in m["routing_retention"].values())
    assert set(results["b"].metrics["routing_retention"]) == {"a"}
    assert store.version(results["c"].version).metrics["routing_retention"] == m["routing_retention"]  # committed
    assert not any("no query anchors" in line for line in logs["b"] + logs["c"])


def test_growth_on_a_trained_parent_keeps_almost_every_anchor_isolated(chain):
    # The tiny model's 8-dim row keys cannot satisfy all 8,192 anchors' bounds at once (the
    # allowed region is empty there; test_isolation.py shows zero violations where it is
    # not): the cycle reports what is left, and it is a tiny share of the (anchor, row) pairs.
    _, results, _, _ = chain
    m = results["c"].metrics
    assert m["routing_isolation"] is True and m["isolation_keys_moved_at_growth"] > 0
    assert 0 <= m["isolation_violations"] < 0.01 * m["anchors"] * GROW


def test_growth_on_a_trained_version_without_anchors_logs_and_grows_unisolated(tmp_path, base):
    shutil.copytree(base, tmp_path / "store")
    with ExpertStore.open(tmp_path / "store") as store:
        model, origin = checkout_model(store, 1, device="cpu")  # no anchors: as versions made before them
        commit_model(store, model, origin=origin, message="trained elsewhere", metrics={"stream": "x"})
        lines: list[str] = []
        res = cycle(store, "a", cfg("freeze-all", epochs=0.1), log=lines.append)
    assert res.policy == "freeze-all" and res.metrics["grown_rows"] == GROW  # trained parent: no override
    assert res.metrics["routing_isolation"] is False and "isolation_violations" not in res.metrics
    assert any("version 2 has no query anchors" in line and "growth without routing isolation" in line for line in lines)
    assert res.metrics["anchors"] > 0


def test_full_after_growth_changes_old_experts_and_adds_none(tmp_path, chain):
    store, results, _, _ = chain
    path = tmp_path / "store"
    shutil.copytree(store.path, path)
    with ExpertStore.open(path) as copy:
        copy.rollback(results["b"].version, why="test: full after a growth")  # b grew and froze; c pending
        res = cycle(copy, "c", cfg("full", epochs=0.1))
        b, c = copy.version(results["b"].version), copy.version(res.version)
        assert res.policy == "full" and experts_by_layer(c) == experts_by_layer(b) and c.metrics["grown_rows"] == 0
        assert not any(s.frozen for s in c.shards)
        pm, _ = checkout_model(copy, b.id, device="cpu")
        cm, _ = checkout_model(copy, c.id, device="cpu")
    for name, old in pm.peer_layers().items():  # the frozen rows trained again
        assert not torch.equal(old.expert_u, cm.peer_layers()[name].expert_u)


def test_guard_keeps_a_candidate_and_leaves_head(after_a):
    store = after_a
    head, n = store.head(), len(store.versions())
    res = cycle(store, "b", cfg(max_forgetting=-1e6))  # any forgetting at all trips it
    assert not res.accepted and res.ref == f"candidate/{res.cycle_id}"
    assert store.head() == head and len(store.versions()) == n + 1
    assert {r.name: r.version_id for r in store.refs()}[res.ref] == res.version
    assert store.version(res.version).parent == head
    row = cycle_rows(store)[-1]
    assert (row.id, row.status, row.version) == (res.cycle_id, "candidate", res.version)
    assert "b" not in store.version("HEAD").cursors  # rolled back: b's data is pending again
    assert cycle(store, "b").accepted


def test_replay_and_distillation_commit(after_a, chain):
    store = after_a
    parent = store.head()
    config = cfg("freeze-experts", replay_ratio=0.25, distill_weight=1.0)
    res = cycle(store, "b", config)
    assert res.accepted and store.head() == res.version
    m = res.metrics
    assert set(m["losses"]) == {"a", "b"} and all(v > 0 for v in m["losses"].values())
    assert set(m["forgetting"]) == {"a"} and m["steps"] > 0
    per_batch = round(0.25 * config.train.batch_size)  # 2 of every 8 rows come from stream a
    assert per_batch > 0 and m["replayed_rows"] == m["steps"] * per_batch
    assert m["distilled_rows"] == m["replayed_rows"]  # every replayed row paid the KL to the parent
    assert store.version(res.version).metrics["replayed_rows"] == m["replayed_rows"]  # committed with the version
    # Replay without distillation: the same rows replayed, none distilled.
    store.rollback(parent, why="test: b again, without distillation")
    m = cycle(store, "b", cfg("freeze-experts", replay_ratio=0.25)).metrics
    assert m["replayed_rows"] == m["steps"] * per_batch and m["distilled_rows"] == 0
    # The chain trained b without replay: nothing replayed, nothing distilled.
    _, results, _, _ = chain
    assert results["b"].metrics["replayed_rows"] == results["b"].metrics["distilled_rows"] == 0


def test_first_cycle_has_nothing_to_replay(tmp_path, base):
    shutil.copytree(base, tmp_path / "store")
    with ExpertStore.open(tmp_path / "store") as store:
        res = cycle(store, "a", cfg(replay_ratio=0.25, distill_weight=1.0))  # no earlier stream
    assert res.accepted and res.metrics["steps"] > 0
    assert res.metrics["replayed_rows"] == res.metrics["distilled_rows"] == 0


def test_lease_held_refuses_without_a_version(after_a):
    store = after_a
    head, n, rows = store.head(), len(store.versions()), len(cycle_rows(store))
    with Lease(store.engine, "cycle", holder="other"):
        with pytest.raises(LeaseHeldError, match="other"):
            cycle(store, "b")
    assert store.head() == head and len(store.versions()) == n and len(cycle_rows(store)) == rows


def test_optimizer_state_is_committed_and_resumed_by_the_next_cycle(after_a):
    assert after_a.version("HEAD").optimizer_hash is not None  # a's cycle (full) committed its optimizer state
    b = cycle(after_a, "b", cfg("full", epochs=0.2))  # the same parameter shapes as a's: resumes a's state
    c = cycle(after_a, "c", cfg("freeze-experts", epochs=0.2))  # grows: new shapes, a fresh optimizer
    assert after_a.version(b.version).optimizer_hash is not None
    assert b.metrics["resumed_optimizer"] and not c.metrics["resumed_optimizer"]
    state = after_a.load_optimizer(b.version)
    assert any(k.startswith("adamw.") for k in state) and any(k.startswith("rows.") for k in state)


@pytest.mark.parametrize("growth", [False, True], ids=["sparse", "sparse-growth"])
def test_a_sparse_cycle_commits_its_few_changed_rows_as_deltas_and_checks_out_exactly(after_a, tiny_config, growth):
    store = after_a
    parent = store.version(store.head())
    res = cycle(store, "b", cfg("sparse", top_t=4, sparse_growth=growth, epochs=0.2))
    v = store.version(res.version)
    assert res.policy == "sparse" and v.metrics["top_t"] == 4
    assert v.metrics["grown_rows"] == (GROW if growth else 0)
    assert (v.metrics.get("routing_isolation") is True) == growth  # the grown rows are isolated from a's anchors
    old = {(s.layer, s.row_start, s.row_end): s for s in parent.shards}
    kept = [s for s in v.shards if (s.layer, s.row_start, s.row_end) in old]
    assert len(kept) == len(old)
    changed = [s for s in kept if s.id != old[(s.layer, s.row_start, s.row_end)].id]
    assert changed and all(s.is_delta and s.base_id == old[(s.layer, s.row_start, s.row_end)].id for s in changed)
    grown = [s for s in v.shards if (s.layer, s.row_start, s.row_end) not in old]
    assert len(grown) == (len({s.layer for s in parent.shards}) if growth else 0)
    model, _ = checkout_model(store, v.id, device="cpu")
    again, _ = checkout_model(store, v.id, device="cpu")
    for (n, a), (_, b) in zip(model.peer_layers().items(), again.peer_layers().items()):
        assert torch.equal(a.expert_u, b.expert_u) and torch.equal(a.all_row_keys(), b.all_row_keys()), n
    for n, layer in checkout_model(store, parent.id, device="cpu")[0].peer_layers().items():
        assert torch.equal(model.peer_layers()[n].all_row_keys()[: layer.n_rows], layer.all_row_keys())  # old keys kept
