"""SIGKILL of a cycle mid-training and mid-commit: the store stays consistent, exactly once."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from cycle_testlib import BUDGET, cycle, cycle_rows, registry
from cycle_testlib import base, chain  # noqa: F401 (fixtures, requested by name)

from expert_store import ExpertStore
from lifelong.cycle import NothingPendingError
from lifelong.records import Lease

# -- SIGKILL ------------------------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from expert_store import ExpertStore
    from streams import StreamRegistry
    import lifelong.cycle as cyc
    from lifelong.config import CycleConfig, TrainConfig

    store = ExpertStore.open(sys.argv[1])
    reg = StreamRegistry(store.engine, work_dir=str(Path(sys.argv[1]) / "streams"))
    commit = cyc.commit_model

    def announced(*a, **kw):
        print("COMMIT", flush=True)
        info = commit(*a, **kw)
        print("COMMITTED", flush=True)
        return info

    cyc.commit_model = announced
    cfg = CycleConfig(grow_rows=2, token_budget=20_000, eval_tokens=2048, epochs=float(sys.argv[2]),
                      train=TrainConfig(batch_size=8))
    cyc.run_cycle(store, reg, "b", cfg, device="cpu", progress=False, log=lambda s: print("LOG", s, flush=True))
    print("DONE", flush=True)
    """
)


def _kill_child(store_path: Path, epochs: float, marker: str, delay: float) -> tuple[int, list[str]]:
    """Start a cycle on b in a child; SIGKILL it ``delay`` s after it prints ``marker``.

    Fails unless the child got that far: one that died early (an import error, a crash
    before the marker) would otherwise leave an untouched store and pass."""
    t0 = time.perf_counter()
    stderr = store_path.with_name(store_path.name + ".stderr")
    with open(stderr, "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(store_path), str(epochs)],
                                stdout=subprocess.PIPE, stderr=err, text=True)
    seen = []
    try:
        for line in proc.stdout:  # type: ignore[union-attr]
            seen.append(line.split()[0])
            if seen[-1] == marker:
                time.sleep(delay)
                break
        exited = proc.poll()  # None: still running, as it should be (or 0: it already finished)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(30)
    print(f"child {marker}+{delay}: {time.perf_counter() - t0:.1f}s, saw {seen}")
    assert marker in seen, f"the child never printed {marker}; saw {seen}; stderr:\n{stderr.read_text()[-2000:]}"
    assert exited in (None, 0), f"the child failed after {marker} (exit {exited}); stderr:\n{stderr.read_text()[-2000:]}"
    return proc.pid, seen


def _check_after_kill(store_path: Path, pid: int, head: int, expected) -> bool:
    """The store is consistent: either nothing happened, or exactly one whole version did."""
    store = ExpertStore.open(store_path)
    try:
        assert store.verify() == []
        # The dead child still holds the cycle lease (TTL 300 s). Release it as the operator
        # would, under the dead holder's name, instead of waiting for it to expire.
        Lease(store.engine, "cycle", holder=f"cli:{socket.gethostname()}:{pid}").release()
        if store.head() == head:
            assert "b" not in store.version("HEAD").cursors
            return False
        v = store.version("HEAD")  # the commit landed before the kill: whole, and exactly once
        assert v.parent == head and v.cursors["b"] == expected.new_cursor
        assert v.metrics["new_docs"] == expected.train_docs
        with pytest.raises(NothingPendingError):
            cycle(store, "b")
        return True
    finally:
        store.close()


def test_sigkill_mid_training_and_mid_commit_leaves_the_store_consistent(tmp_path, chain):
    store, results, expected, _ = chain
    src = Path(store.path)
    head = results["a"].version

    prepared = tmp_path / "prepared"
    shutil.copytree(src, prepared)
    with ExpertStore.open(prepared) as s:
        s.rollback(head, why="test")
        registry(s).stage("b", None, BUDGET)  # staged data: the children skip reading the source

    def fresh(name: str) -> Path:
        shutil.copytree(prepared, tmp_path / name)
        return tmp_path / name

    # Mid-training: the child runs hundreds of steps; kill it 1 s into training.
    path = fresh("train")
    pid, seen = _kill_child(path, 40.0, "LOG", 1.0)
    assert "COMMIT" not in seen
    assert not _check_after_kill(path, pid, head, expected["b"])
    s = ExpertStore.open(path)
    assert [r.status for r in cycle_rows(s)][-1] == "running"  # the dead cycle's row stays 'running'
    res = cycle(s, "b")  # the rerun reads the same data: nothing lost, nothing counted twice
    assert res.accepted and res.metrics["new_docs"] == expected["b"].train_docs
    assert s.version("HEAD").cursors["b"] == expected["b"].new_cursor
    assert s.version("HEAD").cursors["a"] == s.version(head).cursors["a"]
    assert [r.status for r in cycle_rows(s)][-2:] == ["abandoned", "committed"]  # the dead one, marked by the rerun
    with pytest.raises(NothingPendingError):
        cycle(s, "b")
    s.close()

    # Mid-commit, at a few delays after the commit starts (short training: 0.05 epochs):
    # either outcome, each consistent. Then right after commit_model returned: it must have landed.
    landed = []
    for i, (marker, delay) in enumerate((("COMMIT", 0.0), ("COMMIT", 0.015), ("COMMIT", 0.5), ("COMMITTED", 0.0))):
        path = fresh(f"commit{i}")
        pid, seen = _kill_child(path, 0.05, marker, delay)
        landed.append(_check_after_kill(path, pid, head, expected["b"]))
    print("commit landed before the kill:", landed)
    assert landed[-1] is True
