"""`lifelong audit --nproc 2`: the queries are split across 2 CPU ranks (gloo), the counts summed;
the report equals the 1-process one and rank 0 alone prints it and records it."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

from sqlalchemy import select

from expert_store import ExpertStore
from lifelong.cli.main import main
from lifelong.records import AuditRow

FAST = ["--grow-rows", "3", "--budget", "15000", "--eval-tokens", "4096", "--batch-size", "8", "--device", "cpu", "--no-progress"]
AUDIT = ["audit", "--json", "--queries", "256", "--no-progress", "--device", "cpu"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", LIFELONG_DIST_TIMEOUT="120")
    return env


def _counts(rep: dict) -> dict:
    """Everything a report sums, per layer and in total (not the timings)."""
    def stats(s: dict) -> dict:
        return {k: v for k, v in s.items() if k != "max_score_diff"}

    return {
        "total": stats(rep["total"]),
        "layers": {name: {"tokens": lay["tokens"], "total": stats(lay["total"]), "per_head": [stats(h) for h in lay["per_head"]],
                          "experts_used": lay["experts_used"]}
                   for name, lay in rep["layers"].items()},
    }


def test_audit_split_across_two_ranks_equals_one_process(tmp_path, tiny_config_file, capsys):
    rng = random.Random(1)
    (tmp_path / "a.txt").write_text("\n".join("".join(rng.choice("abcdefgh \n") for _ in range(70)) for _ in range(200)))
    store_dir = tmp_path / "store"
    assert main(["--store", str(store_dir), "init", "--config", str(tiny_config_file(n_rows=6, n_cols=10))]) == 0
    assert main(["--store", str(store_dir), "stream", "add", "a", str(tmp_path / "a.txt")]) == 0
    assert main(["--store", str(store_dir), "train", "--stream", "a", *FAST]) == 0
    capsys.readouterr()

    assert main(["--store", str(store_dir), *AUDIT]) == 0
    one = json.loads(capsys.readouterr().out)

    proc = subprocess.run([sys.executable, "-m", "lifelong", "--store", str(store_dir), *AUDIT, "--nproc", "2"],
                          env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    two = json.loads(proc.stdout)  # one report: rank 1 prints nothing
    assert two["passed"] and two["total"]["recall_up_to_ties"] == 1.0
    assert two["total"]["queries"] == 256 * 2
    assert _counts(two) == _counts(one)
    assert two["total"]["recall"] == one["total"]["recall"]
    for name, lay in one["layers"].items():  # usage: gate weights summed over ranks in another order
        assert abs(two["layers"][name]["kl_uniform"] - lay["kl_uniform"]) < 1e-9
        assert two["layers"][name]["usage"] == lay["usage"]
        assert abs(two["layers"][name]["total"]["max_score_diff"] - lay["total"]["max_score_diff"]) < 1e-9

    store = ExpertStore.open(store_dir)
    with store.engine.connect() as conn:
        rows = conn.execute(select(AuditRow.version, AuditRow.queries)).all()
    store.close()
    assert len(rows) == 2 and rows[0] == rows[1]  # the 2-rank audit is recorded once
