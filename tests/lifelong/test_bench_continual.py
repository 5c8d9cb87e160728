"""scripts/bench_continual.py end to end in its smallest mode (tiny model, a few thousand tokens)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_continual.py"


def test_bench_continual_smoke(tmp_path, request):
    # The materialised default streams are a function of this Python and its installed
    # packages: keep them across runs (pytest's cache) when there is one.
    # (no cache with -p no:cacheprovider: a temporary directory then)
    cache = request.config.cache.mkdir("bench_continual_defaults") if getattr(request.config, "cache", None) else tmp_path / "cache"
    arms = ["dense", "freeze-experts", "branch", "replay-distill"]
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--json", "--threads", "1", "--arms", ",".join(arms),
         "--work-dir", str(tmp_path / "work"), "--cache-dir", str(cache)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert [r["arm"] for r in lines[:-1]] == arms
    for r in lines[:-1]:
        m = r["loss_matrix"]
        assert m["streams"] == ["stdlib", "pydoc", "licenses"]
        assert m["trained"] == ["stdlib", "pydoc", "licenses"]
        assert all(x is not None for x in m["values"][-1])  # every stream has a held-out set
        assert set(r["forgetting"]) == {"stdlib", "pydoc"}
        assert set(r["new_stream_loss"]) == {"pydoc", "licenses"}
    by_arm = {r["arm"]: r for r in lines[:-1]}
    assert by_arm["dense"]["experts"] == 0 and by_arm["freeze-experts"]["experts"] > 0
    assert by_arm["replay-distill"]["policy"] == "freeze-experts"  # freeze-all did not run
    assert by_arm["branch"]["policy"] == "branch" and by_arm["branch"]["experts"] == by_arm["freeze-experts"]["experts"]
    # every PEER arm starts from the same base version: identical first row
    assert by_arm["freeze-experts"]["loss_matrix"]["values"][0] == by_arm["replay-distill"]["loss_matrix"]["values"][0]
    summary = lines[-1]["summary"]
    assert summary["best_growth_arm"] in ("freeze-experts", "branch")
    assert set(summary["targets"]) == {"a_forgetting", "b_plasticity"}
    assert "summary" in proc.stderr and "loss matrix" in proc.stderr
    # a second run in the same work dir reuses the dense base (same model, sizes, streams, seed)
    # and rebuilds it for another seed
    for seed, said in ((0, "[base-dense] reused"), (1, "built differently")):
        again = subprocess.run(
            [sys.executable, str(SCRIPT), "--smoke", "--json", "--threads", "1", "--arms", "dense", "--seed", str(seed),
             "--reuse-bases", "--work-dir", str(tmp_path / "work"), "--cache-dir", str(cache)],
            capture_output=True, text=True, timeout=300,
        )
        assert again.returncode == 0 and said in again.stderr, again.stderr[-3000:]
        dense = json.loads(again.stdout.splitlines()[0])
        if seed == 0:  # the same base and the same cycles: the same matrix
            assert dense["loss_matrix"]["values"] == by_arm["dense"]["loss_matrix"]["values"]


def _scripts(name: str):
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(SCRIPT.parent))


def _arm(name: str, forgetting: float, new: float, final: float, model: str = "peer", policy: str = "freeze-all") -> dict:
    return {"arm": name, "model": model, "policy": policy, "replay_ratio": 0.0, "mean_forgetting": forgetting,
            "mean_new_stream_loss": new, "final_mean_loss": final}


def test_the_recommended_arm_remembers_first_then_learns():
    report = _scripts("continual_report")
    dense = _arm("dense", 0.20, 2.50, 2.70, model="dense", policy="full")
    learns = _arm("learns", 0.15, 2.55, 2.60)  # best final mean, but forgets 75% of dense
    remembers = _arm("remembers", 0.01, 2.80, 2.70)
    both_ok = _arm("remembers-and-learns", 0.015, 2.75, 2.69)
    s = report.summarise({r["arm"]: r for r in (dense, learns, remembers, both_ok)})
    assert s["best_growth_arm"] == "learns" and s["recommended_arm"] == "remembers-and-learns"
    assert s["arms_meeting_both"] == []  # 2.75 > 1.05 x 2.50
    s = report.summarise({r["arm"]: r for r in (dense, learns)})
    assert s["recommended_arm"] == "learns"  # none meets (a): the one forgetting least


def test_sparse_arms_take_their_top_t_from_the_name():
    bench = _scripts("bench_continual")
    assert bench.arm_named("sparse-t64").top_t == 64 and bench.arm_named("sparse-t64").policy == "sparse"
    grow = bench.arm_named("sparse-grow-t16")
    assert (grow.top_t, grow.sparse_growth, grow.isolation) == (16, True, True)
    assert bench.arm_named("sparse").top_t is None
    for bad in ("sparse-t0", "sparse-tx", "freeze-all-t4", "nope"):
        assert bench.arm_named(bad) is None
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--arms", "dense,sparse-t0"], capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown arm(s): sparse-t0" in proc.stderr
