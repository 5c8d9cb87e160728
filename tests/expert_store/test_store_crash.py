"""Crash safety and concurrency, with real processes killed by SIGKILL."""

from __future__ import annotations

import pytest

from expert_store import ExpertStore


def test_sigkill_during_commits_leaves_a_consistent_store(crash_store) -> None:
    # 20 kills at uniform(0, 0.3) s into a loop of commits of ~0.5 MB shards and delta
    # shards; after each kill: verify() is clean, HEAD's objects all load (delta chains
    # applied), the next commit succeeds, gc removes the leftovers (check_after_kill).
    summary = crash_store.run(trials=20, rows=8, d=256, max_delay=0.3, seed=1)
    assert summary.failures == []
    assert summary.trials == 20
    # The kills landed in different phases: some left unreachable objects behind.
    assert summary.kills_leaving_unreachable_objects > 0
    assert summary.versions_committed > 20
    # Every commit after the first sparse-updates each layer's first shard (a delta), and
    # the chains grew past MAX_DELTA_CHAIN (compacted at commit time).
    assert summary.delta_shards > 20 and summary.compactions > 0


@pytest.mark.sqlite_only  # opens by path; both backends: test_backends.py
def test_two_processes_commit_on_the_same_parent(crash_store, store: ExpertStore) -> None:
    crash_store.make_commit(store, step=1, rows=2, d=8, who="setup")
    for round_ in range(3):
        parent = store.head()
        outcomes = crash_store.race(str(store.path), parent, n=2, seed=10 * round_)
        kinds = sorted(kind for kind, _ in outcomes)
        assert kinds == ["conflict", "ok"], outcomes
        winner = next(value for kind, value in outcomes if kind == "ok")
        loser = next(value for kind, value in outcomes if kind == "conflict")
        assert f"expected version {parent}" in loser
        assert store.head() == winner and store.version(winner).parent == parent
        assert store.verify() == []
    assert len(store.versions()) == 4  # setup + one winner per round; no half versions
    # The loser's objects are merely unreachable; gc collects them, reachable ones stay.
    removed = store.gc(grace_s=0)
    assert len(removed.objects) == 3 * 2  # each loser wrote a shard and its dense weights
    assert store.verify() == []
