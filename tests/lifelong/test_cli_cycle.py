"""`lifelong cycle` and `lifelong eval` end to end through the real CLI, in-process."""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time

import pytest
from sqlalchemy import select

from expert_store import ExpertStore
from lifelong.cli.main import main
from lifelong.config import config_to_dict, cycle_config
from lifelong.records import CycleRow

FAST = ["--grow-rows", "2", "--budget", "20000", "--eval-tokens", "2048", "--batch-size", "8", "--device", "cpu", "--no-progress"]


@pytest.fixture()
def store_dir(tmp_path, tiny_config_file, capsys):
    rng = random.Random(0)
    for name, alphabet in (("a", "abcdefgh "), ("b", "0123456789+= ")):
        (tmp_path / f"{name}.txt").write_text("\n".join("".join(rng.choice(alphabet) for _ in range(60)) for _ in range(120)))
    path = tmp_path / "store"
    assert main(["--store", str(path), "init", "--config", str(tiny_config_file())]) == 0
    for name in "ab":
        assert main(["--store", str(path), "stream", "add", name, str(tmp_path / f"{name}.txt")]) == 0
    capsys.readouterr()
    return path


def run(store_dir, *args, capsys):
    code = main(["--store", str(store_dir), *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def show(store_dir, version: str, capsys) -> dict:
    code, out, _ = run(store_dir, "show", version, "--json", capsys=capsys)
    assert code == 0
    return json.loads(out)


def test_cycle_guard_and_eval(store_dir, capsys):
    # The first cycle on the untrained base is trained in full whatever the policy (default branch).
    code, out, err = run(store_dir, "cycle", "--stream", "a", *FAST, "--json", capsys=capsys)
    assert code == 0, err
    res = json.loads(out)  # stdout is pure JSON; the cycle's log lines went to stderr
    assert res["accepted"] and res["ref"] == "HEAD" and res["head"] == res["version"] == 2
    assert res["policy"] == "full" and res["experts_added"] == 0 and res["metrics"]["grown_rows"] == 0
    assert "version 1 has never been trained: this cycle trains it in full" in err
    assert set(res["metrics"]["losses"]) == {"a"} and res["metrics"]["anchors"] > 0
    assert (store_dir / "tensorboard").is_dir()

    # The version records the resolved cycle config (defaults < flags, every field; the policy
    # that ran), its training config as run: the steps and warm-up the cycle derived from the data.
    resolved = config_to_dict(cycle_config({"grow_rows": 2, "token_budget": 20000, "eval_tokens": 2048, "batch_size": 8}))
    assert resolved["policy"] == "branch" and resolved["max_branches"] == 8
    saved = show(store_dir, "HEAD", capsys)["config"]["run"]["cycle"]
    assert res["config"] == saved and {**saved, "train": None} == {**resolved, "policy": "full", "train": None}
    derived = {"steps": None, "warmup_steps": None}
    assert {**saved["train"], **derived} == {**resolved["train"], **derived}
    assert saved["train"]["steps"] == res["metrics"]["steps"]
    code, out, _ = run(store_dir, "show", "HEAD", capsys=capsys)
    assert code == 0 and "resolved config of the run that made it:" in out
    lines = out.splitlines()
    for line in ("cycle.policy: full", "cycle.grow_rows: 2", "cycle.token_budget: 20000", "cycle.max_forgetting: None",
                 "cycle.routing_isolation: True", "cycle.train.batch_size: 8", f"cycle.train.lr: {resolved['train']['lr']}",
                 f"cycle.train.steps: {res['metrics']['steps']}"):
        assert f"  {line}" in lines, line

    # The guard: any forgetting trips it; the version is a candidate, HEAD stays, exit 0 but loud.
    # (This growth runs without routing isolation, as the flag asks.)
    code, out, err = run(store_dir, "cycle", "--stream", "b", "--policy", "freeze-all", *FAST, "--max-forgetting=-1e6",
                         "--no-routing-isolation", capsys=capsys)
    assert code == 0 and "GUARD FAILED" in out and "candidate/2" in out and "HEAD stays at 2" in out
    assert "GUARD FAILED" in err and "policy freeze-all" in out
    store = ExpertStore.open(store_dir)
    assert store.head() == 2 and {r.name: r.version_id for r in store.refs()}["candidate/2"] == 3
    store.close()
    candidate = show(store_dir, "candidate/2", capsys)
    assert candidate["metrics"]["routing_isolation"] is False and "isolation_violations" not in candidate["metrics"]
    assert candidate["config"]["run"]["cycle"]["routing_isolation"] is False
    assert candidate["experts"] == 64 + 2 * 8  # grown: the parent was trained

    # Nothing moved: b is still pending against HEAD; now it commits, routing-isolated (the default).
    code, out, err = run(store_dir, "cycle", "--stream", "b", "--policy", "freeze-all", *FAST, capsys=capsys)
    assert code == 0 and "committed version 4: HEAD 2 -> 4" in out and "forgetting" in out
    m = show(store_dir, "HEAD", capsys)["metrics"]
    assert m["policy"] == "freeze-all" and m["grown_rows"] == 2 and m["routing_isolation"] is True
    assert isinstance(m["isolation_violations"], int) and m["anchors"] > res["metrics"]["anchors"]
    assert list(m["routing_retention"]) == ["a"] and 0.0 <= m["routing_retention"]["a"] <= 1.0

    code, out, _ = run(store_dir, "eval", "--json", capsys=capsys)
    ev = json.loads(out)
    m = ev["matrix"]
    assert ev["version"] == 4 and m["versions"] == [2, 4] and m["streams"] == ["a", "b"] and m["trained"] == ["a", "b"]
    assert m["values"][0][1] is None and all(x is not None for x in m["values"][1])
    assert list(ev["forgetting"]) == ["a"] and ev["mean_forgetting"] == pytest.approx(ev["forgetting"]["a"])
    assert ev["backward_transfer"] is not None and ev["usage"]
    code, out, _ = run(store_dir, "eval", capsys=capsys)
    assert code == 0 and "version  trained" in out and "BWT" in out and "KL to uniform" in out
    code, out, _ = run(store_dir, "eval", "--version", "candidate/2", "--json", capsys=capsys)
    assert code == 0 and json.loads(out)["matrix"]["versions"] == [2, 3]

    # Failures are one line and exit 1; nothing is written.
    code, _, err = run(store_dir, "cycle", "--stream", "a", *FAST, capsys=capsys)
    assert code == 1 and "nothing pending" in err and "Traceback" not in err
    code, _, err = run(store_dir, "cycle", "--stream", "nope", *FAST, capsys=capsys)
    assert code == 1 and err.startswith("error:") and "nope" in err
    assert len(ExpertStore.open(store_dir).versions()) == 4


@pytest.mark.parametrize("argv", [["cycle"], ["cycle", "--stream", "a", "--policy", "bogus"],
                                  ["cycle", "--stream", "a", "--grow-rows", "0"], ["cycle", "--stream", "a", "--top-t", "0"],
                                  ["cycle", "--stream", "a", "--top-t", "-3"], ["eval", "--bogus"]])
def test_usage_errors_exit_2(tmp_path, argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--store", str(tmp_path), *argv])
    assert exc.value.code == 2


def test_sparse_cycles_from_the_cli_with_and_without_growth(store_dir, capsys):
    assert run(store_dir, "train", "--stream", "a", *FAST, capsys=capsys)[0] == 0  # a trained parent
    code, _, err = run(store_dir, "cycle", "--stream", "b", *FAST, "--policy", "sparse", "--top-t", "100000", capsys=capsys)
    assert code == 1 and "top_t=100000 exceeds the 64 experts" in err and err.count("\n") == 1 and "Traceback" not in err
    code, out, err = run(store_dir, "cycle", "--stream", "b", *FAST, "--policy", "sparse", "--sparse-growth", "--top-t", "4",
                         "--json", capsys=capsys)
    assert code == 0, err
    m = json.loads(out)["metrics"]
    assert m["policy"] == "sparse" and m["top_t"] == 4 and m["grown_rows"] == 2 and m["routing_isolation"] is True
    assert json.loads(out)["config"]["sparse_growth"] is True


def test_bad_config_is_one_line(store_dir, tmp_path, capsys):
    (tmp_path / "c.json").write_text(json.dumps({"policy": "freeze-all", "bogus": 1}))
    code, _, err = run(store_dir, "cycle", "--stream", "a", "--config", str(tmp_path / "c.json"), capsys=capsys)
    assert code == 1 and "bogus" in err
    (tmp_path / "c.json").write_text(json.dumps({"train": {"bogus": 1}}))
    code, _, err = run(store_dir, "cycle", "--stream", "a", "--config", str(tmp_path / "c.json"), capsys=capsys)
    assert code == 1 and "bogus" in err and err.count("\n") <= 2


def test_sigterm_stops_the_cycle_without_a_version(store_dir, capsys):
    def terminate_once_handled() -> None:
        # Send SIGTERM only once the CLI's handler is installed (the default would kill pytest).
        deadline = time.monotonic() + 60
        while signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None) and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)  # delivered to the main thread, which runs the cycle

    before = signal.getsignal(signal.SIGTERM)
    t = threading.Thread(target=terminate_once_handled, daemon=True)
    t.start()
    code, out, err = run(store_dir, "cycle", "--stream", "a", *FAST, "--epochs", "50", capsys=capsys)
    t.join(5)
    assert code == 130 and "SIGTERM" in err and "no version" in err
    assert signal.getsignal(signal.SIGTERM) == before  # handlers restored
    store = ExpertStore.open(store_dir)
    assert store.head() == 1 and len(store.versions()) == 1
    with store.engine.connect() as conn:
        assert [r.status for r in conn.execute(select(CycleRow.__table__))] == ["interrupted"]
