"""I/O faults while staging a stream: nothing half-staged, no cursor moved, one line for the
user, and the retry stages it all (harness: tests/faultlib.py; every point:
scripts/fault_inject.py --ops ingest)."""

from __future__ import annotations

import errno
import sys
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import create_engine

sys.path.append(str(Path(__file__).resolve().parents[1]))  # tests/: the harness

import faultlib  # noqa: E402
import faultops  # noqa: E402
from streams import IngestResult, StreamWriteError  # noqa: E402
from streams.fsutil import atomic_write_bytes, write_errors  # noqa: E402
from streams.schema import metadata  # noqa: E402
from streams.staging import list_staged, save_staged  # noqa: E402


def test_lifelong_ingest_under_faults(tmp_path: Path) -> None:
    report = faultlib.sweep(faultops.ingest(), errno.ENOSPC, work=tmp_path, sample=lambda p: p.kind)
    assert report.failures == [], "\n".join(report.failures)
    assert {"db-write", "db-commit", "mkdir"} <= set(report.kinds)


def test_a_failed_staging_write_stages_nothing(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'db'}")
    metadata.create_all(engine)
    res = IngestResult(stream="s", cursor=None, new_cursor={"v": 1, "files": {}, "rows": 3},
                       train_tokens=np.arange(5, dtype=np.int32), heldout_tokens=np.arange(0, dtype=np.int32),
                       train_docs=1, heldout_docs=0, rows=3, bytes=5, bad_rows={}, bad_examples=[], files=[],
                       exhausted=True)
    for kind in ("db-write", "db-commit"):
        with faultlib.Injector(fail_kind=kind, errno=errno.EIO), pytest.raises(StreamWriteError) as caught:
            save_staged(engine, "k", res)
        assert str(caught.value).startswith("I/O error while saving the staged data of stream 's'")
        assert str(caught.value).endswith("nothing was staged and no cursor moved") and "\n" not in str(caught.value)
        assert list_staged(engine, "s") == []
    save_staged(engine, "k", res)
    assert [s.key for s in list_staged(engine, "s")] == ["k"]


def test_atomic_write_bytes_leaves_the_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "f"
    atomic_write_bytes(target, b"old")
    for kind in ("open", "write", "fsync", "replace"):
        with faultlib.Injector(fail_kind=kind, errno=errno.ENOSPC), pytest.raises(OSError):
            atomic_write_bytes(target, [b"new", b"er"])
        assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_write_errors_names_the_disk_and_lets_input_errors_pass(tmp_path: Path) -> None:
    with pytest.raises(StreamWriteError, match=r"^disk full while copying x \(No space left on device: /p\); kept"):
        with write_errors("copying x", "kept"):
            raise OSError(errno.ENOSPC, "No space left on device", "/p")
    with pytest.raises(FileNotFoundError), write_errors("copying x", "kept"):
        raise FileNotFoundError(errno.ENOENT, "missing", "/p")  # about the input: unchanged
