"""Fixtures of the expert store tests: a fresh store and the crash harness."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from expert_store import ExpertStore

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


@pytest.fixture
def store(tmp_path: Path) -> ExpertStore:
    s = ExpertStore.init(tmp_path / "store", {"d_model": 16})
    yield s
    s.close()


@pytest.fixture
def crash_store():
    """The crash/race harness in scripts/crash_store.py, imported as a module."""
    sys.path.insert(0, str(SCRIPTS))
    import crash_store as module

    return module
