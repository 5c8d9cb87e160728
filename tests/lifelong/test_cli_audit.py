"""`lifelong audit` through the real CLI: recall on trained, grown and rolled-back versions,
the database row, TensorBoard scalars, and clear errors."""

from __future__ import annotations

import json
import random

import pytest
from sqlalchemy import select
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from expert_store import ExpertStore
from lifelong.cli.main import main
from lifelong.records import AuditRow

FAST = ["--grow-rows", "3", "--budget", "15000", "--eval-tokens", "4096", "--batch-size", "8", "--device", "cpu", "--no-progress"]


def run(store_dir, *args, capsys):
    code = main(["--store", str(store_dir), *args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture()
def store_dir(tmp_path, tiny_config_file, capsys):
    rng = random.Random(1)
    for name, alphabet in (("a", "abcdefgh \n"), ("b", "0123456789+= \n")):
        (tmp_path / f"{name}.txt").write_text("\n".join("".join(rng.choice(alphabet) for _ in range(70)) for _ in range(200)))
    path = tmp_path / "store"
    assert main(["--store", str(path), "init", "--config", str(tiny_config_file(n_rows=6, n_cols=10))]) == 0
    capsys.readouterr()
    return path


def test_audit_on_trained_grown_and_rolled_back_versions(tmp_path, store_dir, capsys):
    # No streams yet: a clear error, exit 1.
    code, _, err = run(store_dir, "audit", capsys=capsys)
    assert code == 1 and "error:" in err and "Traceback" not in err
    for name in "ab":
        assert main(["--store", str(store_dir), "stream", "add", name, str(tmp_path / f"{name}.txt")]) == 0
    assert run(store_dir, "train", "--stream", "a", *FAST, capsys=capsys)[0] == 0
    assert run(store_dir, "cycle", "--stream", "b", *FAST, capsys=capsys)[0] == 0  # grown (rectangular grid)

    code, out, err = run(store_dir, "audit", "--json", "--queries", "256", "--no-progress", capsys=capsys)
    assert code == 0, err
    rep = json.loads(out)
    assert rep["passed"] and rep["total"]["recall_up_to_ties"] == 1.0 and rep["extra"]["version"] == 3
    assert rep["total"]["queries"] == 256 * 2  # queries x heads

    code, out, _ = run(store_dir, "audit", "HEAD~1", "--totals", "--no-progress", "--queries", "128", capsys=capsys)
    assert code == 0 and "PASS" in out
    assert run(store_dir, "rollback", "HEAD~1", capsys=capsys)[0] == 0
    assert run(store_dir, "audit", "--no-progress", "--queries", "128", capsys=capsys)[0] == 0  # rolled back

    store = ExpertStore.open(store_dir)
    with store.engine.connect() as conn:
        rows = conn.execute(select(AuditRow.version, AuditRow.recall, AuditRow.queries)).all()
    assert [r.version for r in rows] == [3, 2, 2] and all(r.recall == 1.0 for r in rows)
    acc = EventAccumulator(str(store_dir / "tensorboard"))
    acc.Reload()
    assert "audit/total/recall_up_to_ties" in acc.Tags()["scalars"]

    # Bad input: unknown version, unknown stream, stream without held-out text.
    assert run(store_dir, "audit", "v99", capsys=capsys)[0] == 1
    code, _, err = run(store_dir, "audit", "--streams", "nope", capsys=capsys)
    assert code == 1 and "nope" in err
    (tmp_path / "empty.txt").write_text("x\n")
    assert main(["--store", str(store_dir), "stream", "add", "tiny", str(tmp_path / "empty.txt")]) == 0
    code, _, err = run(store_dir, "audit", "--streams", "tiny", capsys=capsys)
    assert code == 1 and "held-out" in err
