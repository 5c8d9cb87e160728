from __future__ import annotations

import os

import pytest

from stream_testlib import docs_of, write_jsonl
from streams import (BinaryFileError, BlankFileError, EmptyFileError, EncodingError,
                     MalformedJSONError, MissingFieldError, UnreadableFileError,
                     VanishedFileError)
from streams.ingest import _Reader


def _setup(registry, tmp_path, name, content: bytes, fmt="jsonl", fname=None):
    d = tmp_path / name
    d.mkdir()
    (d / "good.jsonl").write_text('{"text": "fine one"}\n{"text": "fine two"}\n') if fmt == "jsonl" \
        else (d / "good.txt").write_text("fine one\nfine two\n")
    (d / (fname or ("bad.jsonl" if fmt == "jsonl" else "bad.txt"))).write_bytes(content)
    registry.add(name, str(d), fmt, holdout=0.0)
    registry.add(name + "-skip", str(d), fmt, holdout=0.0, on_bad_rows="skip")
    return d


CASES = [
    ("malformed", b'{"text": "ok"}\n{"text": "broken"\n{"text": "ok2"}\n', "jsonl",
     MalformedJSONError, "line 2", {"malformed_json": 1}, ["fine one", "fine two", "ok", "ok2"]),
    ("missing", b'{"text": "ok"}\n{"body": "no text"}\n', "jsonl",
     MissingFieldError, "line 2", {"missing_field": 1}, ["fine one", "fine two", "ok"]),
    ("latin1", b"caf\xe9 au lait\nplain\n", "text",
     EncodingError, "line 1", {"encoding": 1}, ["fine one", "fine two", "plain"]),
    ("latin1json", b'{"text": "caf\xe9"}\n{"text": "ok"}\n', "jsonl",
     EncodingError, "line 1", {"encoding": 1}, ["fine one", "fine two", "ok"]),
    ("nuljson", b'{"text": "ok"}\n{"text": "a \\u0000 b"}\n', "jsonl",  # PostgreSQL text cannot hold it either
     EncodingError, "line 2", {"encoding": 1}, ["fine one", "fine two", "ok"]),
    ("empty", b"", "jsonl", EmptyFileError, "empty", {"empty_file": 1}, ["fine one", "fine two"]),
    ("blank", b"\n\n  \n\n", "text", BlankFileError, "blank", {"blank_file": 1}, ["fine one", "fine two"]),
    ("binary", bytes(range(256)) * 40, "text", BinaryFileError, "binary", {"binary_file": 1},
     ["fine one", "fine two"]),
]


@pytest.mark.parametrize("name,content,fmt,exc,where,counts,docs", CASES, ids=[c[0] for c in CASES])
def test_bad_input_error_and_skip(registry, tmp_path, name, content, fmt, exc, where, counts, docs):
    d = _setup(registry, tmp_path, name, content, fmt)
    with pytest.raises(exc) as info:
        registry.ingest(name)
    assert "bad." in str(info.value) and where in str(info.value)
    assert info.value.path.endswith("bad.jsonl" if fmt == "jsonl" else "bad.txt")
    res = registry.ingest(name + "-skip")
    assert res.bad_rows == counts
    assert sorted(docs_of(res.train_tokens)) == sorted(docs)
    assert res.bad_examples and str(d) in res.bad_examples[0]
    # a bad file consumed in skip mode is not counted again on the next ingest
    assert registry.ingest(name + "-skip", res.new_cursor).bad_rows == {}


def test_bare_stopiteration_from_datasets_is_converted(tmp_path):
    from streams.sources import _convert

    try:
        def gen():
            raise StopIteration
            yield
        list(gen())
    except RuntimeError as exc:
        err = _convert(exc, "x.jsonl")
    assert isinstance(err, EmptyFileError) and "x.jsonl" in str(err)


def test_csv_null_row_named(registry, tmp_path):
    (tmp_path / "a.csv").write_text("text,n\nhello,1\n,2\nworld,3\n")
    registry.add("c", str(tmp_path / "a.csv"), "csv", holdout=0.0)
    with pytest.raises(MissingFieldError, match="row 1"):
        registry.ingest("c")
    registry.add("c2", str(tmp_path / "a.csv"), "csv", holdout=0.0, on_bad_rows="skip")
    res = registry.ingest("c2")
    assert docs_of(res.train_tokens) == ["hello", "world"] and res.bad_rows == {"missing_field": 1}


def test_directory_where_file_expected_and_dangling_symlink(registry, tmp_path):
    d = tmp_path / "g"
    d.mkdir()
    (d / "a.txt").write_text("alpha\n")
    (d / "sub.txt").mkdir()  # a directory matched by the glob
    registry.add("g", str(d / "*.txt"), "text", holdout=0.0)
    with pytest.raises(UnreadableFileError, match="sub.txt.*directory"):
        registry.ingest("g")
    link = tmp_path / "l"
    link.mkdir()
    (link / "a.txt").write_text("beta\n")
    os.symlink(tmp_path / "missing.txt", link / "dangling.txt")
    registry.add("l", str(link), "text", holdout=0.0)
    with pytest.raises(UnreadableFileError, match="dangling"):
        registry.ingest("l")
    registry.add("l2", str(link), "text", holdout=0.0, on_bad_rows="skip")
    res = registry.ingest("l2")
    assert docs_of(res.train_tokens) == ["beta"] and res.bad_rows == {"unreadable": 1}


def test_file_deleted_between_listing_and_reading(registry, tmp_path, monkeypatch):
    d = tmp_path / "v"
    write_jsonl(d / "a.jsonl", ["a"])
    write_jsonl(d / "b.jsonl", ["b"])
    registry.add("v", str(d), "jsonl", holdout=0.0)
    registry.add("v2", str(d), "jsonl", holdout=0.0, on_bad_rows="skip")
    original = _Reader.run_file

    def deleting(self, path):  # the file vanishes right after the listing
        if path.endswith("b.jsonl") and os.path.exists(path):
            os.unlink(path)
        return original(self, path)

    monkeypatch.setattr(_Reader, "run_file", deleting)
    with pytest.raises(VanishedFileError, match="b.jsonl"):
        registry.ingest("v")
    write_jsonl(d / "b.jsonl", ["b"])
    res = registry.ingest("v2")
    assert docs_of(res.train_tokens) == ["a"] and res.bad_rows == {"vanished": 1}
    assert str(d / "b.jsonl") not in res.new_cursor["files"]  # read again next time
