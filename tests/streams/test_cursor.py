"""``Cursor`` JSON round trip and validation, and ``cursor_key``."""
from __future__ import annotations

import json

import pytest

from streams import Cursor, CursorError, FileCursor
from streams.cursor import cursor_key

DATA = {"v": 1, "rows": 3,
        "files": {"/b.jsonl": {"size": 5, "sha256": "bb", "rows": 2, "bytes": 4, "done": True},
                  "/a.jsonl": {"size": 9, "sha256": "aa", "rows": 1, "bytes": 8, "done": False}}}


def test_round_trip_from_dict_and_string():
    c = Cursor.from_json(DATA)
    assert c.rows == 3 and c.files["/b.jsonl"] == FileCursor(5, "bb", 2, 4, True)
    out = c.to_json()
    assert out == DATA and list(out["files"]) == ["/a.jsonl", "/b.jsonl"]  # sorted paths
    assert Cursor.from_json(json.dumps(DATA)) == c
    assert Cursor.from_json(None) == Cursor() and Cursor().to_json() == {"v": 1, "files": {}, "rows": 0}


@pytest.mark.parametrize("bad", [{"v": 2, "files": {}}, {"files": {}}, [1], "not json",
                                 {"v": 1, "files": {"/a": {"size": 1}}},
                                 {"v": 1, "files": {"/a": {"size": 1, "sha256": "x", "bogus": 0}}},
                                 {"v": 1, "files": [], "rows": 0}, {"v": 1, "rows": "many"}])
def test_invalid_cursors_raise_cursor_error(bad):
    with pytest.raises(CursorError, match="invalid stream cursor"):
        Cursor.from_json(bad)


def test_copy_is_deep():
    c = Cursor.from_json(DATA)
    d = c.copy()
    d.files["/a.jsonl"].rows += 10
    d.files["/new"] = FileCursor(1, "cc")
    assert c.to_json() == DATA


def test_cursor_key_is_canonical():
    a = cursor_key({"x": 1, "y": [1, 2]}, 100, "byte-260")
    assert a == cursor_key({"y": [1, 2], "x": 1}, 100, "byte-260")  # key order does not matter
    assert len(a) == 64 and int(a, 16) >= 0
    assert a != cursor_key({"x": 1, "y": [1, 2]}, 101, "byte-260")
    assert cursor_key(None, None) != cursor_key(None)
