"""scripts/bench_branches.py in its smallest form: the figures it prints exist and add up."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_branches.py"


def test_bench_branches_prints_cost_per_branch_count():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--max-branches", "2", "--blocks", "2", "--rounds", "1",
                           "--threads", "1", "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["branches"] for r in rows] == [0, 1, 2] and rows[0]["time_ratio"] == 1.0
    assert all(0 < r["branch_bytes"] < r["model_bytes"] for r in rows) and all(r["tokens_per_s"] > 0 for r in rows)
    assert "one branch holds" in proc.stderr and "time vs none" in proc.stderr
    bad = subprocess.run([sys.executable, str(SCRIPT), "--rounds", "0"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--rounds" in bad.stderr
