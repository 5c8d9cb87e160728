from __future__ import annotations

import pytest

from stream_testlib import docs_of
from streams import default_sources, register_defaults
from streams.defaults import materialise_licenses


def test_licenses_materialised_and_ingested(registry, tmp_path):
    out = materialise_licenses(tmp_path / "cache")
    names = {p.parent.name.split("-")[0].lower() for p in out.rglob("*.txt")}
    assert {"numpy", "sqlalchemy"} <= names
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.txt")}
    materialise_licenses(tmp_path / "cache")  # idempotent: files not rewritten
    assert before == {p: p.stat().st_mtime_ns for p in out.rglob("*.txt")}
    registry.add("licenses", str(out), "text", text_mode="file", pattern="*.txt", holdout=0.05)
    res = registry.ingest("licenses", token_budget=200_000)
    docs = docs_of(res.train_tokens) + docs_of(res.heldout_tokens)
    assert docs and any("Permission is hereby granted" in d or "Redistribution" in d for d in docs)


@pytest.mark.sqlite_only  # slow (embedded data); the registry's SQL runs on both in test_registry
def test_register_defaults(registry, tmp_path):
    specs = register_defaults(registry, tmp_path / "cache")
    assert [s.name for s in specs] == ["stdlib", "pydoc", "licenses"]
    again = register_defaults(registry, tmp_path / "cache")  # idempotent: the same rows back
    assert [s.fingerprint() for s in again] == [s.fingerprint() for s in specs]
    assert sorted(again, key=lambda s: s.name) == registry.list()
    assert [s.name for s in default_sources(tmp_path / "cache")] == ["stdlib", "pydoc", "licenses"]
    p = registry.pending("pydoc")
    assert p.files == 2 and p.docs > 1000
    res = registry.ingest("pydoc", token_budget=50_000)
    assert res.train_docs > 10 and not res.exhausted
    stdlib = registry.ingest("stdlib", token_budget=100_000)
    assert any("def " in d for d in docs_of(stdlib.train_tokens))
    assert all("/test/" not in f.path and "site-packages" not in f.path for f in stdlib.files)
