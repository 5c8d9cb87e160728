"""Fixtures of the expert store tests: a fresh store on each backend and the crash harness.

``store`` is created on the test's ``backend`` (tests/backends.py): every test that uses
it runs on SQLite and on PostgreSQL (``pytest -k postgresql``) unless marked
``sqlite_only``. Reopen it with ``ExpertStore.open(store.path, url=store.url)``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from backends import Backend
from expert_store import ExpertStore

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


@pytest.fixture
def store(tmp_path: Path, backend: Backend) -> ExpertStore:
    s = ExpertStore.init(tmp_path / "store", {"d_model": 16}, url=backend.url)
    yield s
    s.close()


@pytest.fixture
def crash_store():
    """The crash/race harness in scripts/crash_store.py, imported as a module."""
    sys.path.insert(0, str(SCRIPTS))
    import crash_store as module

    return module
