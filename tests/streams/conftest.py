from __future__ import annotations

import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from sqlalchemy import create_engine

from streams import StreamRegistry


@pytest.fixture()
def registry(tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path / 'store.db'}")
    yield StreamRegistry(engine, work_dir=str(tmp_path))
    engine.dispose()
