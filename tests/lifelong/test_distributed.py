"""Data-parallel cycles on 2 CPU processes (gloo, launched through `--nproc 2` = torchrun).

Tolerance: on a trained parent the 2-rank version equals the 1-process one to 1e-5 absolute
on every tensor (measured: at most 4e-6, on the query anchors; the weights 4e-7): gradients
are summed in another order, nothing else differs. (On a freshly initialised model a
product-key top-k near a tie can flip between the two runs and the runs then drift apart, as
two 1-process runs with different thread counts can.)
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from sqlalchemy import select

from cycle_testlib import cycle, cycle_rows, make_store, registry
from expert_store import ExpertStore
from lifelong.checkpoint import checkout_model
from lifelong.cli.main import main
from lifelong.config import CycleConfig, TrainConfig
from lifelong.records import LeaseRow

ATOL = 1e-5
FLAGS = ["--policy", "freeze-experts", "--grow-rows", "2", "--budget", "6000", "--eval-tokens", "1024", "--batch-size", "8",
         "--no-progress"]


def _cfg(policy: str = "freeze-experts") -> CycleConfig:  # what FLAGS give
    return CycleConfig(policy=policy, grow_rows=2, token_budget=6000, eval_tokens=1024, train=TrainConfig(batch_size=8))


def _lifelong(*args: str, **kw) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.Popen([sys.executable, "-m", "lifelong", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **kw)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_config) -> Path:
    """A store whose HEAD has trained on stream a (1 process); b and c pending."""
    path = make_store(tmp_path_factory.mktemp("dist"), tiny_config())
    store = ExpertStore.open(path)
    cycle(store, "a", _cfg(policy="full"))
    store.close()
    return path


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src.parent, dst)  # the store and the streams' sources beside it
    return dst / "store"


def test_two_ranks_commit_the_one_process_version(trained, tmp_path):
    one, two = _copy(trained, tmp_path / "one"), _copy(trained, tmp_path / "two")
    # (the streams' sources are registered by absolute path: both copies read the same text)
    s1 = ExpertStore.open(one)
    cycle(s1, "b", _cfg())
    proc = _lifelong("--store", str(two), "cycle", "--stream", "b", *FLAGS, "--nproc", "2")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert out.count("committed version 3") == 1, out  # rank 0 alone speaks
    s2 = ExpertStore.open(two)
    assert s1.head() == s2.head() == 3
    a, _ = checkout_model(s1, "HEAD", device="cpu")
    b, _ = checkout_model(s2, "HEAD", device="cpu")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].shape == sb[name].shape, name
        torch.testing.assert_close(sb[name], sa[name], rtol=0, atol=ATOL, msg=lambda m, n=name: f"{n}: {m}")
    oa, ob = s1.load_optimizer(3), s2.load_optimizer(3)
    assert oa.keys() == ob.keys()
    for name in oa:
        torch.testing.assert_close(ob[name].double(), oa[name].double(), rtol=1e-4, atol=ATOL, msg=lambda m, n=name: f"{n}: {m}")
    ma, mb = s1.version(3).metrics, s2.version(3).metrics
    assert ma["steps"] == mb["steps"] and ma["new_tokens"] == mb["new_tokens"]
    assert mb["train_loss"] == pytest.approx(ma["train_loss"], abs=1e-4)
    assert mb["losses"]["b"] == pytest.approx(ma["losses"]["b"], abs=1e-4)
    assert s2.version(3).cursors == s1.version(3).cursors


def _rank_pid(store: Path, rank: int) -> int | None:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes()
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(store).encode() in cmd and b"-m\0lifelong" in cmd and f"RANK={rank}".encode() in env:
            return int(entry.name)
    return None


def test_rank_killed_mid_cycle_writes_nothing_and_the_rerun_works(trained, tmp_path):
    path = _copy(trained, tmp_path / "kill")
    proc = _lifelong("--store", str(path), "cycle", "--stream", "b", *FLAGS, "--epochs", "200", "--nproc", "2")
    lines: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:  # rank 0 says so before it trains
        lines.append(line)
        if line.startswith("cycle ") and "blocks" in line:
            break
    time.sleep(2.0)  # well into training (200 epochs: minutes)
    pid = _rank_pid(path, 1)
    assert pid is not None, "".join(lines)
    os.kill(pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0
    store = ExpertStore.open(path)
    assert store.head() == 2 and [v.id for v in store.log()] == [2, 1]  # no version
    assert not store.verify()
    with store.engine.connect() as conn:
        assert list(conn.execute(select(LeaseRow.__table__))) == []  # rank 0 released the lease
    assert cycle_rows(store)[-1].status in ("failed", "interrupted"), out
    res = cycle(store, "b", _cfg())  # the rerun
    assert res.accepted and store.head() == res.version == 3
    assert store.version(3).cursors["b"] == registry(store).ingest("b", None, 6000, use_staged=False).new_cursor


@pytest.mark.parametrize("flags, message", [
    (["--nproc", "3"], "batch size 8 is not divisible by the 3 processes"),
    (["--nproc", "2", "--batch-size", "5"], "batch size 5 is not divisible by the 2 processes"),
    (["--nproc", "3", "--batch-size", "9", "--expert-parallel"], "d_model 32 is not divisible by the 3 processes"),
])
def test_bad_layouts_fail_before_any_training(trained, tmp_path, capsys, flags, message):
    path = _copy(trained, tmp_path / "bad")
    assert main(["--store", str(path), "cycle", "--stream", "b", "--no-progress", *flags]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[0] and len(err) <= 2, err
    assert ExpertStore.open(path).head() == 2


def test_nproc_must_be_positive(capsys):
    with pytest.raises(SystemExit):
        main(["--store", "x", "cycle", "--stream", "b", "--nproc", "0"])
    assert "expected a number of processes >= 1" in capsys.readouterr().err
