"""I/O faults in the store: a failed write leaves the version before or after, says so in one
line, and the retry works (harness: tests/faultlib.py; every point: scripts/fault_inject.py).

Here one point of each kind (open, write, fsync, replace, mkdir, chmod, unlink, a database
write, a commit) and the last one, per operation; the script fails every point, ENOSPC and EIO.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import sys
from pathlib import Path

import pytest
import torch
from sqlalchemy.exc import OperationalError

sys.path.append(str(Path(__file__).resolve().parents[1]))  # tests/: the harness

import faultlib  # noqa: E402
import faultops  # noqa: E402
from expert_store import ExpertStore, NewShard, StoreWriteError, atomic_write  # noqa: E402


def _check(report: faultlib.Report) -> None:
    assert report.failures == [], "\n".join(report.failures)
    assert report.injected > 0


CASES = [("commit-first", errno.ENOSPC), ("commit-incremental", errno.EIO), ("rollback", errno.EIO),
         ("tag", errno.ENOSPC), ("gc", errno.EIO)]


@pytest.mark.parametrize("name, err", CASES, ids=[f"{n}-{errno.errorcode[e]}" for n, e in CASES])
def test_a_failed_write_leaves_before_or_after(name: str, err: int, tmp_path: Path) -> None:
    report = faultlib.sweep(faultops.OPERATIONS[name](), err, work=tmp_path, sample=lambda p: p.kind)
    _check(report)
    if name.startswith("commit"):  # every kind of call a commit makes was broken once
        assert {"open", "write", "fsync", "replace", "mkdir", "chmod", "db-write", "db-commit"} <= set(report.kinds)


def test_the_injector_fails_the_nth_call_and_restores(tmp_path: Path) -> None:
    target = tmp_path / "f"
    with faultlib.Injector(None) as counter:
        atomic_write(target, b"x")
    kinds = [p.kind for p in counter.points]
    assert kinds == ["open", "write", "write", "fsync", "replace", "open", "fsync"]  # + the directory's fsync
    for n, kind in enumerate(kinds, 1):
        with faultlib.Injector(n, errno.EIO) as inj, pytest.raises(OSError) as caught:
            atomic_write(target, b"y")
        assert inj.fired is not None and inj.fired.kind == kind and caught.value.errno == errno.EIO
        assert target.read_bytes() == (b"y" if n > kinds.index("replace") + 1 else b"x")  # 1-based
        assert [p.name for p in tmp_path.iterdir()] == ["f"]  # no temp file left
    assert os.replace.__module__ in ("posix", "nt") and open.__module__ == "io"  # the real calls are back


def test_a_failed_database_commit_is_a_store_write_error(tmp_path: Path) -> None:
    store = ExpertStore.init(tmp_path / "s", {})
    store.commit(shards=[], dense={"w": torch.ones(2)}, message="m", parent=None)
    with faultlib.Injector(fail_kind="db-commit"), pytest.raises(StoreWriteError) as caught:
        store.commit(shards=[NewShard("l", 0, 1, 1, {"u": torch.ones(1)})], dense={"w": torch.zeros(2)},
                     message="m2", parent=1)
    assert str(caught.value).startswith("disk full while recording the version")
    assert str(caught.value).endswith("nothing was committed")
    assert isinstance(caught.value.__cause__, OperationalError)
    assert isinstance(caught.value.__cause__.orig, sqlite3.OperationalError)
    assert store.head() == 1 and len(store.versions()) == 1 and store.verify() == []
    store.close()
