"""I/O faults in a cycle's commit with its cursor move: the store is at the parent or at the
new version with the stream's new cursor (exactly once), the error is one line, the retry
trains and commits the same data, and a failure after the commit (the cycle's row, its
staged data, the lease) is only a warning (every point: scripts/fault_inject.py --ops
cycle-commit)."""

from __future__ import annotations

import errno
import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1]))  # tests/: the harness

import faultlib  # noqa: E402
import faultops  # noqa: E402

SITES = (("write", "objects.py"), ("db-commit", "store.py"), ("db-write", "finish_cycle"))


def test_a_cycle_commit_under_faults(tmp_path: Path) -> None:
    def site(point: faultlib.Point) -> object:  # one point of each site above, and the last (the lease)
        return next((s for s in SITES if point.kind == s[0] and s[1] in point.where), None)

    report = faultlib.sweep(faultops.cycle(), errno.EIO, work=tmp_path, sample=site)
    assert report.failures == [], "\n".join(report.failures)
    assert report.injected == len(SITES) + 1  # and the last point: the lease's release
    assert report.tolerated == 2  # the row and the lease, after the commit: warnings
