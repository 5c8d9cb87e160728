"""Exactly once across SIGKILL: kill a subprocess mid-ingest/mid-cycle several times,
re-run to completion, and check the committed documents equal the source's."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from sqlalchemy import create_engine, text

from stream_testlib import write_jsonl
from streams import StreamRegistry, is_heldout

WORKER = Path(__file__).with_name("crash_worker.py")
ROOT = Path(__file__).resolve().parents[2]


def test_sigkill_mid_ingest_no_duplicates_no_gaps(tmp_path):
    rng = random.Random(0)
    texts = [f"doc {i} " + "y" * rng.randrange(1, 60) for i in range(1200)]
    for k in range(6):
        write_jsonl(tmp_path / "src" / f"part{k}.jsonl", texts[k * 200:(k + 1) * 200])
    db = tmp_path / "store.db"
    engine = create_engine(f"sqlite:///{db}")
    StreamRegistry(engine).add("s", str(tmp_path / "src"), "jsonl", holdout=0.1)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{WORKER.parent}"}
    cmd = [sys.executable, str(WORKER), str(db), "1500", "0.02"]
    kills = 0
    for delay in (2.2, 2.6, 3.0):
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(delay)
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
            kills += 1
        p.wait()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "DONE" in done.stdout
    assert kills >= 1
    with engine.connect() as c:
        committed = [r[0] for r in c.execute(text("SELECT doc FROM fake_trained"))]
        n_versions = c.execute(text("SELECT count(*) FROM fake_versions")).scalar_one()
    expected = [t for t in texts if not is_heldout(t, 0.1)]
    assert n_versions > 5
    assert len(committed) == len(set(committed))  # nothing counted twice
    assert sorted(committed) == sorted(expected)  # nothing skipped
