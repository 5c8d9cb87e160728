"""Fixtures of the streams tests: a registry on each database backend (tests/backends.py)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from sqlalchemy import create_engine

from backends import Backend
from streams import StreamRegistry


@pytest.fixture()
def registry(tmp_path, backend: Backend):
    """A registry on SQLite (``store.db`` in ``tmp_path``) or a fresh PostgreSQL schema."""
    engine = create_engine(backend.engine_url("store.db"))
    yield StreamRegistry(engine, work_dir=str(tmp_path))
    engine.dispose()
