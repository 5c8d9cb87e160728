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


def write_jsonl(path, texts, field="text"):
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({field: t}) + "\n" for t in texts))
    return path


def docs_of(tokens):
    """Split a flat token array (EOS after each doc) back into document texts."""
    from streams import EOS_ID, ByteTokenizer

    tok, out, start = ByteTokenizer(), [], 0
    arr = list(tokens)
    for i, t in enumerate(arr):
        if t == EOS_ID:
            out.append(tok.decode(arr[start:i]))
            start = i + 1
    return out
