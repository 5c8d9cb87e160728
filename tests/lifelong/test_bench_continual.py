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
    arms = ["dense", "freeze-experts", "replay-distill"]
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
    # every PEER arm starts from the same base version: identical first row
    assert by_arm["freeze-experts"]["loss_matrix"]["values"][0] == by_arm["replay-distill"]["loss_matrix"]["values"][0]
    summary = lines[-1]["summary"]
    assert summary["best_growth_arm"] in ("freeze-experts", "replay-distill")
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
