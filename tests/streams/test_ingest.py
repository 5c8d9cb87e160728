from __future__ import annotations

import json
import time

import numpy as np
import pandas as pd
import pytest

from stream_testlib import docs_of, write_jsonl
from streams import ChangedFileError, SourceNotFoundError, SourceUnavailableError, is_heldout


def all_docs(res):
    return docs_of(res.train_tokens) + docs_of(res.heldout_tokens)


def test_text_modes(registry, tmp_path):
    d = tmp_path / "t"
    d.mkdir()
    (d / "a.txt").write_text("one\ntwo\n\nthree\n")
    (d / "b.txt").write_text("para one\nstill one\n\npara two\n")
    registry.add("lines", str(d / "a.txt"), "text", text_mode="line", holdout=0.0)
    registry.add("paras", str(d / "b.txt"), "text", text_mode="paragraph", holdout=0.0)
    registry.add("files", str(d / "*.txt"), "text", text_mode="file", holdout=0.0)
    assert all_docs(registry.ingest("lines")) == ["one", "two", "three"]
    assert [s.strip() for s in all_docs(registry.ingest("paras"))] == ["para one\nstill one", "para two"]
    got = all_docs(registry.ingest("files"))
    assert got == [(d / "a.txt").read_text(), (d / "b.txt").read_text()]


def test_jsonl_csv_parquet(registry, tmp_path):
    write_jsonl(tmp_path / "j" / "a.jsonl", ["x1", "x2"], field="body")
    pd.DataFrame({"body": ["c1", "c2", "c3"], "n": [1, 2, 3]}).to_csv(tmp_path / "a.csv", index=False)
    pd.DataFrame({"body": ["p1", "p2"]}).to_parquet(tmp_path / "a.parquet")
    registry.add("j", str(tmp_path / "j"), "jsonl", text_field="body", holdout=0.0)
    registry.add("c", str(tmp_path / "a.csv"), "csv", text_field="body", holdout=0.0)
    registry.add("p", str(tmp_path / "a.parquet"), "parquet", text_field="body", holdout=0.0)
    assert all_docs(registry.ingest("j")) == ["x1", "x2"]
    assert all_docs(registry.ingest("c")) == ["c1", "c2", "c3"]
    assert all_docs(registry.ingest("p")) == ["p1", "p2"]


def test_cursor_resume_budget_exactly_once(registry, tmp_path):
    texts = [f"document {i} " + "x" * (i % 13) for i in range(300)]
    write_jsonl(tmp_path / "d" / "a.jsonl", texts[:150])
    write_jsonl(tmp_path / "d" / "b.jsonl", texts[150:])
    registry.add("s", str(tmp_path / "d"), "jsonl", holdout=0.1)
    cursor, seen, results = None, [], []
    while True:
        res = registry.ingest("s", cursor, token_budget=700)
        seen += all_docs(res)
        results.append(res)
        cursor = res.new_cursor
        if res.exhausted:
            break
    assert len(results) > 5
    assert sorted(seen) == sorted(texts)  # no duplicates, no gaps
    held = [t for t in texts if is_heldout(t, 0.1)]
    assert sorted(d for r in results for d in docs_of(r.heldout_tokens)) == sorted(held)
    assert all(not is_heldout(d, 0.1) for r in results for d in docs_of(r.train_tokens))
    assert registry.pending("s", cursor).docs == 0
    assert registry.ingest("s", cursor).empty
    # held-out set accumulated in the database, first-seen order, stable prefix
    h = registry.heldout("s")
    assert h.docs == len(held) and sorted(docs_of(h.tokens)) == sorted(held)
    assert docs_of(registry.heldout("s", max_docs=3).tokens) == docs_of(h.tokens)[:3]


def test_drop_folder_new_and_changed_files(registry, tmp_path):
    drop = tmp_path / "drop"
    write_jsonl(drop / "a.jsonl", ["a1", "a2"])
    registry.add("s", str(drop), "jsonl", holdout=0.0)
    r1 = registry.ingest("s")
    assert all_docs(r1) == ["a1", "a2"]
    assert registry.pending("s", r1.new_cursor).files == 0
    write_jsonl(drop / "b.jsonl", ["b1"])
    (drop / ".c.jsonl.tmp").write_text("half written")  # writers rename into place
    p = registry.pending("s", r1.new_cursor)
    assert (p.files, p.new_files, p.docs) == (1, 1, 1)
    r2 = registry.ingest("s", r1.new_cursor)
    assert all_docs(r2) == ["b1"] and [f.status for f in r2.files] == ["new"]
    time.sleep(0.01)
    write_jsonl(drop / "a.jsonl", ["a1", "a2", "a3 rewritten"])
    p = registry.pending("s", r2.new_cursor)
    assert p.changed_files == [str(drop / "a.jsonl")]
    r3 = registry.ingest("s", r2.new_cursor)
    assert [(f.status, f.action) for f in r3.changed_files] == [("changed", "reread")]
    assert all_docs(r3) == ["a1", "a2", "a3 rewritten"]
    registry.add("strict", str(drop), "jsonl", on_changed="error")
    with pytest.raises(ChangedFileError, match="a.jsonl"):
        registry.ingest("strict", r2.new_cursor)
    registry.add("lenient", str(drop), "jsonl", on_changed="skip")
    r4 = registry.ingest("lenient", r2.new_cursor)
    assert r4.empty and r4.changed_files[0].action == "skip"
    assert registry.ingest("lenient", r4.new_cursor).changed_files == []


def test_staging_reads_ahead_and_goes_stale(registry, tmp_path):
    write_jsonl(tmp_path / "d" / "a.jsonl", [f"doc {i}" for i in range(50)])
    registry.add("s", str(tmp_path / "d"), "jsonl")
    staged = registry.stage("s", None, token_budget=200)
    assert not staged.from_staging and len(registry.staged("s")) == 1
    again = registry.ingest("s", None, token_budget=200)
    assert again.from_staging and again.new_cursor == staged.new_cursor
    assert np.array_equal(again.train_tokens, staged.train_tokens)
    assert not registry.ingest("s", None, token_budget=100).from_staging  # other key
    time.sleep(0.01)
    write_jsonl(tmp_path / "d" / "a.jsonl", [f"changed {i}" for i in range(50)])
    assert not registry.ingest("s", None, token_budget=200).from_staging  # stale
    assert registry.clear_staged("s") == 1 and registry.staged("s") == []
    info = registry.info("s").to_dict()
    assert info["pending"]["docs"] == 50 and json.dumps(info)


def test_missing_source_and_offline_hub(registry, tmp_path):
    with pytest.raises(SourceNotFoundError, match="nope"):
        registry.add("s", str(tmp_path / "nope"), "text")
    with pytest.raises(SourceNotFoundError):
        registry.add("g", str(tmp_path / "nodir" / "*.txt"), "text")
    registry.add("h", "some-org/some-dataset-that-is-not-cached", "hub")
    t = time.monotonic()
    with pytest.raises(SourceUnavailableError, match="some-dataset"):
        registry.ingest("h")
    assert time.monotonic() - t < 10
    assert registry.pending("h").docs is None
