"""``infer_format``: a stream's format from its files' extensions (``stream add`` without
``--format``), for a file, a drop folder, a glob; several formats are an error saying which."""

from __future__ import annotations

import pytest

from streams import SpecError
from streams.sources import format_of, infer_format


@pytest.mark.parametrize("name,fmt", [("a.jsonl", "jsonl"), ("a.NDJSON", "jsonl"), ("a.json", "json"),
                                      ("a.csv", "csv"), ("a.parquet", "parquet"), ("a.pq", "parquet"),
                                      ("a.txt", "text"), ("a.md", "text"), ("a.py", "text"), ("README", "text"),
                                      ("a.jsonl.txt", "text")])
def test_format_of_an_extension(name, fmt):
    assert format_of(name) == fmt


def test_infer_from_a_file_a_folder_and_a_glob(tmp_path):
    (tmp_path / "one.jsonl").write_text('{"text": "a"}\n')
    assert infer_format([str(tmp_path / "one.jsonl")]) == ("jsonl", "inferred from the extension of one.jsonl")
    drop = tmp_path / "drop"
    (drop / "sub").mkdir(parents=True)
    for name in ("a.csv", "sub/b.csv", ".hidden.txt", "c.csv.part"):  # hidden and temp files do not count
        (drop / name).write_text("text\nx\n")
    fmt, why = infer_format([str(drop)])
    assert fmt == "csv" and "its 2 files" in why
    assert infer_format([str(drop / "**" / "*.csv")])[0] == "csv"
    assert infer_format([str(tmp_path / "empty*.parquet")]) == ("text", "no file to infer it from yet")
    (drop / "notes.md").write_text("notes\n")
    with pytest.raises(SpecError, match=r"several formats \(2 csv \(e\.g\. .*\), 1 text \(e\.g\. notes\.md\)\); pass --format"):
        infer_format([str(drop)])
    assert infer_format([str(drop)], pattern="*.md") == ("text", "inferred from the extension of notes.md")
    with pytest.raises(SpecError, match="several formats"):
        infer_format([str(tmp_path / "one.jsonl"), str(drop / "a.csv")])
