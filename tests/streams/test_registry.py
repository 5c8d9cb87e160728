"""``StreamRegistry``'s own verbs: add/get/list/remove, held-out caps, old databases."""
from __future__ import annotations

from datetime import datetime, timezone

import pytest
from sqlalchemy import JSON, Column, create_engine, func, insert, select

from stream_testlib import docs_of, write_jsonl
from streams import (SpecError, StreamExistsError, StreamNameError, StreamNotFoundError,
                     StreamRegistry)
from streams.schema import metadata, stream_files, stream_heldout, stream_registry, stream_staged


def rows(registry, table, name):
    with registry.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(table)
                            .where(table.c.stream == name)).scalar_one()


def test_registry_crud(registry, tmp_path):
    (tmp_path / "d").mkdir()
    spec = registry.add("s1", str(tmp_path / "d"), "jsonl", holdout=0.1, exclude=("x/*",))
    assert spec.name == "s1" and registry.get("s1").holdout == 0.1
    assert registry.get("s1").fingerprint() == spec.fingerprint()
    with pytest.raises(StreamExistsError):
        registry.add("s1", str(tmp_path / "d"), "jsonl")
    assert registry.add("s1", str(tmp_path / "d"), "jsonl", holdout=0.1, exclude=("x/*",),
                        exist_ok=True).name == "s1"
    with pytest.raises(StreamExistsError):  # exist_ok only forgives an identical registration
        registry.add("s1", str(tmp_path / "d"), "jsonl", holdout=0.2, exist_ok=True)
    with pytest.raises(StreamNameError):
        registry.add("../evil", str(tmp_path / "d"))
    with pytest.raises(SpecError):
        registry.add("s2", str(tmp_path / "d"), "xml")
    registry.add("a0", [str(tmp_path / "d")], "text")
    assert [s.name for s in registry.list()] == ["a0", "s1"]
    assert registry.get("a0").source == (str(tmp_path / "d"),)
    d = registry.get("s1").to_dict()
    assert d["format"] == "jsonl" and d["source"] == str(tmp_path / "d")
    assert "cursor" not in d  # the registry keeps no cursor: the version's is the only one
    registry.remove("s1")
    with pytest.raises(StreamNotFoundError):
        registry.get("s1")
    with pytest.raises(StreamNotFoundError):
        registry.remove("s1")
    with pytest.raises(StreamNameError):
        registry.get("a/b")


def test_remove_drops_index_staged_and_heldout_but_not_sources(registry, tmp_path):
    src = write_jsonl(tmp_path / "d" / "a.jsonl", [f"doc {i}" for i in range(40)])
    registry.add("s", str(src.parent), "jsonl", holdout=0.3)
    registry.add("other", str(src.parent), "jsonl", holdout=0.3)
    for name in ("s", "other"):
        registry.stage(name, None)
    assert rows(registry, stream_files, "s") and rows(registry, stream_staged, "s")
    assert rows(registry, stream_heldout, "s")
    registry.remove("s")
    assert [rows(registry, t, "s") for t in (stream_files, stream_staged, stream_heldout)] == [0, 0, 0]
    assert rows(registry, stream_staged, "other") == 1 and registry.heldout("other").docs > 0
    assert src.read_text().count("\n") == 40
    registry.add("s", str(src.parent), "jsonl", holdout=0.3)  # a clean slate
    assert registry.heldout("s").docs == 0 and registry.staged("s") == []


def test_heldout_max_tokens_cuts_at_a_document_boundary(registry, tmp_path):
    texts = [f"held {i} " + "y" * i for i in range(30)]
    src = write_jsonl(tmp_path / "d" / "a.jsonl", texts)
    registry.add("s", str(src.parent), "jsonl", holdout=0.99)
    registry.ingest("s")
    full = registry.heldout("s")
    first = docs_of(full.tokens)
    assert full.docs == len(first) > 5
    cap = len(first[0]) + len(first[1]) + 2 + 3  # two whole documents (with EOS) and a bit
    part = registry.heldout("s", max_tokens=cap)
    assert part.tokens.shape[0] <= cap and part.docs == len(docs_of(part.tokens)) == 2
    assert docs_of(part.tokens) == first[:2]
    assert registry.heldout("s", max_tokens=1).docs == 0


def test_database_with_the_old_cursor_column_still_works(tmp_path):
    """Databases made before the registry's ``cursor`` column was dropped keep it."""
    engine = create_engine(f"sqlite:///{tmp_path / 'old.db'}")
    old = stream_registry.to_metadata(type(metadata)())
    old.append_column(Column("cursor", JSON, nullable=True))
    old.create(engine)
    src = write_jsonl(tmp_path / "d" / "a.jsonl", ["one", "two"])
    with engine.begin() as conn:
        conn.execute(insert(old), [{"name": "legacy", "source": str(src), "format": "jsonl",
                                    "options": {}, "holdout": 0.0, "created_at": datetime.now(timezone.utc),
                                    "cursor": {"v": 1, "files": {}, "rows": 7}}])
    reg = StreamRegistry(engine, work_dir=str(tmp_path))
    reg.add("fresh", str(src), "jsonl", holdout=0.0)
    assert [s.name for s in reg.list()] == ["fresh", "legacy"]
    assert docs_of(reg.ingest("legacy").train_tokens) == ["one", "two"]  # the old cursor is ignored
    engine.dispose()
