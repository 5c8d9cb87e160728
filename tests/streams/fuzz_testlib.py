"""Fuzzing the stream readers: hostile file contents and the property every ingest holds.

A *case* is a stream (format, text mode, bad-row policy, layout) and the bytes of its
files, made from valid files of the format by mutations: truncation, random bytes,
invalid UTF-8, NUL bytes, huge lines, deep JSON, other encodings, CSV rows with the wrong
columns, broken Parquet. ``run_case`` drives the real path (``StreamRegistry.add``, an
ingest of a good file for a cursor, the hostile files, ``ingest(..., stage=True)``) and
checks the property: a clean ingest whose result is consistent (re-reading from its
cursor finds nothing new; valid input gives back exactly its documents), or exactly one
``StreamError`` naming the file (and its line where the format has lines) with the
cursor and the staged data unchanged. Used by ``test_fuzz.py`` and
``scripts/fuzz_streams.py``.
"""

from __future__ import annotations

import copy
import csv
import io
import itertools
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field

from hypothesis import strategies as st
from sqlalchemy import func, select

from stream_testlib import docs_of
from streams import (BadInputError, BinaryFileError, BlankFileError, EmptyFileError,
                     StreamError, UnreadableFileError)
from streams.schema import stream_staged

# (format, text mode, extension of its files)
KINDS = [("text", "line", ".txt"), ("text", "paragraph", ".txt"), ("text", "file", ".txt"),
         ("jsonl", "line", ".jsonl"), ("json", "line", ".json"), ("csv", "line", ".csv"),
         ("parquet", "line", ".parquet")]
LINE_FORMATS = ("text", "jsonl", "json", "csv")  # errors inside such a file name a line
WHOLE_FILE_ERRORS = (EmptyFileError, BlankFileError, BinaryFileError, UnreadableFileError)
HUGE = 1 << 21  # a huge line: 2 MiB, over the text reader's 1 MiB chunk

_names = itertools.count()
EXAMPLES: dict[str, str] = {}  # a message of each StreamError class seen (the script shows them)


# -- valid files --------------------------------------------------------------------------

texts = st.lists(st.text(st.characters(blacklist_categories=("Cs",)), max_size=24),
                 min_size=1, max_size=6)


def valid_bytes(fmt: str, mode: str, docs: list[str], json_array: bool = False) -> bytes:
    """A well-formed file of ``fmt`` holding ``docs``."""
    if fmt == "text":
        sep = "\n\n" if mode == "paragraph" else "\n"
        return (sep.join(docs) + "\n").encode()
    if fmt in ("jsonl", "json"):
        rows = [{"text": d, "n": i} for i, d in enumerate(docs)]
        if json_array:
            return json.dumps(rows, indent=1).encode()
        return "".join(json.dumps(r) + "\n" for r in rows).encode()
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["text", "n"])
        w.writerows([d, i] for i, d in enumerate(docs))
        return buf.getvalue().encode()
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table({"text": docs, "n": list(range(len(docs)))}), buf)
    return buf.getvalue()


def expected_docs(fmt: str, mode: str, docs: list[str]) -> list[str] | None:
    """The documents an ingest of ``valid_bytes`` gives back, where simple to say."""
    if fmt in ("text", "csv") and any("\x00" in d for d in docs):
        return None  # NUL bytes make a text or CSV file binary: an error, or skipped whole
    if fmt != "text":
        return [d for d in docs if d.strip()]
    if mode == "file":  # the reader translates universal newlines
        whole = ("\n".join(docs) + "\n").replace("\r\n", "\n").replace("\r", "\n")
        return [whole] if whole.strip() else []
    if mode == "paragraph":
        if any("\r" in d for d in docs):
            return None
        return [p for p in ("\n\n".join(docs) + "\n").split("\n\n") if p.strip()]
    if any(c in d for d in docs for c in "\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"):
        return None  # the reader's own line splitting: only the generic checks apply
    return [d for d in docs if d.strip()]


# -- mutations ----------------------------------------------------------------------------

JUNK = [b"\x00", b"\xff", b"\xfe\xff", b"\xc3", b"\xe9", b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
        b"\x80\x80", b"\r", b"\r\n", b"\n\n", b'"', b",", b"{", b"}", b"[", b"]", b"\\",
        b"\xef\xbb\xbf", "é".encode("utf-16"), "naïve".encode("latin-1"), b"\x1a", b"\t"]


RECORDS = [b'{"text": "ok", "n": "a string now"}', b'{"text": "ok", "n": {"a": [1, null]}}',
           b'{"text": "ok", "n": 123456789012345678901234567890}', b'{"text": "ok", "n": 1e400}',
           b'{"text": "ok", "n": -1e-400}', b'{"text": "ok", "n": NaN}', b'{"text": "ok", "n": Infinity}',
           b'{"text": 5}', b'{"text": null}', b'{"text": ["a"]}', b'{"text": {"a": "b"}}', b'[1, 2]',
           b'"just a string"', b'{"text": "a", "text": "b"}', b'{"text": "a\\ud800b"}',
           b'{"text": "\\ud83d\\ude00 ok"}', b'{"text": "a\\u0000b"}', b'{"Text": "case"}', b"{}",
           b'{"": "empty key", "text": "k"}', b'{"text": "' + b"9" * 5000 + b'"}', b"1" * 400,
           b'{"text": "tab\there"}', b'{"text": "raw\x01ctl"}', b"null", b"true", b'{"text": "x"} {}']


@st.composite
def deep_json(draw):
    """A line of deep JSON appended, or every record that deep (a file where depths mix is
    read with the deep values as JSON strings; one where all are deep is not)."""
    depth = draw(st.sampled_from([64, 100, 900, 62, 59, 20, 300, 5000, 200_000]))
    closed = draw(st.integers(0, 3)) != 0
    body = b"[" * depth + (b"]" * depth if closed else b"")
    obj = b'{"x": ' * depth + b"1" + b"}" * depth
    line = draw(st.sampled_from([b'{"text": "d", "x": ' + body + b"}", b'{"text": "d", "x": ' + obj + b"}",
                                 body, b'{"text": ' + body + b"}"]))
    if draw(st.booleans()):
        return ("replace", (line + b"\n") * draw(st.integers(1, 3)))
    return ("append", line + b"\n")


@st.composite
def mutation(draw, fmt: str):
    kind = draw(st.sampled_from(["truncate", "insert", "junk", "random", "encode", "nul",
                                 "huge", "deep", "deep", "columns", "append", "record", "record",
                                 "parquet" if fmt == "parquet" else "columns"]))
    if kind == "parquet":
        return ("parquet", draw(st.integers(0, len(PARQUETS) - 1)))
    if kind == "record":
        return ("record", draw(st.sampled_from(RECORDS)), draw(st.booleans()))
    if kind == "truncate":
        return ("truncate", draw(st.floats(0, 1)))
    if kind == "insert":
        return ("insert", draw(st.floats(0, 1)), draw(st.binary(min_size=1, max_size=16)))
    if kind == "junk":
        return ("insert", draw(st.floats(0, 1)), draw(st.sampled_from(JUNK)))
    if kind == "random":
        return ("replace", draw(st.binary(max_size=300)))
    if kind == "encode":
        return ("encode", draw(st.sampled_from(["latin-1", "utf-16", "utf-16-le", "cp1252", "utf-32"])))
    if kind == "nul":
        return ("insert", draw(st.floats(0, 1)), b"\x00" * draw(st.integers(1, 9000)))
    if kind == "huge":
        return ("append", draw(st.sampled_from([b"x" * HUGE + b"\n", b'{"text": "' + b"y" * HUGE + b'"}\n',
                                                b"z" * HUGE])))
    if kind == "deep":
        return draw(deep_json())
    if kind == "columns":
        return ("append", draw(st.sampled_from([b"a,b,c,d,e\n", b"only\n", b'"unclosed,1\n', b",\n",
                                                b"text,n\n", b"x," * 50 + b"\n", b"\n\n\n"])))
    return ("append", draw(st.binary(max_size=40)))


def _parquet(**columns) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table(columns), buf)
    return buf.getvalue()


PARQUETS = [lambda: _parquet(text=[1, 2]), lambda: _parquet(body=["a"]), lambda: _parquet(text=["a", None]),
            lambda: _parquet(text=[["a"], ["b", "c"]]), lambda: _parquet(text=[b"\xff", b"a"]),
            lambda: _parquet(text=[{"a": "b"}]), lambda: _parquet(text=["a\x00b", "\ud7ff"]),
            lambda: _parquet(text=[1.5, None])]


def mutate(data: bytes, muts: list[tuple]) -> bytes:
    for m in muts:
        if m[0] == "truncate":
            data = data[: int(len(data) * m[1])]
        elif m[0] == "insert":
            k = int(len(data) * m[1])
            data = data[:k] + m[2] + data[k:]
        elif m[0] == "replace":
            data = m[1]
        elif m[0] == "parquet":
            data = PARQUETS[m[1]]()
        elif m[0] == "encode":
            data = data.decode("utf-8", "replace").encode(m[1], "replace")
        elif m[0] == "record":  # one more record: an element of an array, else a line
            if data.startswith(b"[") and data.rstrip().endswith(b"]"):
                data = b"[" + m[1] + b", " + data[1:] if m[2] else data.rstrip()[:-1] + b", " + m[1] + b"]"
            else:
                data = m[1] + b"\n" + data if m[2] else data + m[1] + b"\n"
        else:
            data = data + m[1]
    return data


# -- cases --------------------------------------------------------------------------------

@dataclass
class Case:
    fmt: str
    mode: str
    ext: str
    on_bad_rows: str
    layout: str                   # file | drop | glob
    docs: list[str]
    json_array: bool
    muts: list[tuple]
    extra: list[bytes] = field(default_factory=list)  # more hostile files (drop, glob)

    def hostile(self) -> bytes:
        return mutate(valid_bytes(self.fmt, self.mode, self.docs, self.json_array), self.muts)


@st.composite
def cases(draw, kinds=tuple(KINDS), max_muts: int = 3):
    fmt, mode, ext = draw(st.sampled_from(kinds))
    if fmt in ("jsonl", "json") and draw(st.integers(0, 4)) == 0:
        muts = [draw(deep_json())]  # alone: other mutations would mostly break it first
    else:
        muts = draw(st.lists(mutation(fmt), max_size=max_muts))
    extra = draw(st.lists(st.binary(max_size=64), max_size=2))
    return Case(fmt, mode, ext, draw(st.sampled_from(["error", "skip"])),
                draw(st.sampled_from(["file", "drop", "glob"])), draw(texts),
                fmt == "json" and draw(st.booleans()), muts, extra)


# -- the property -------------------------------------------------------------------------

def _staged_rows(reg, name: str) -> int:
    with reg.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(stream_staged)
                            .where(stream_staged.c.stream == name)).scalar_one()


def check_error(err: BaseException, case: Case, paths: list[str]) -> None:
    """One ``StreamError``, one line, naming a file of the stream (and a line when it can)."""
    assert isinstance(err, StreamError), f"{type(err).__name__} escaped: {err!r}"
    msg = str(err)
    assert "\n" not in msg, f"message of more than one line: {msg!r}"
    assert any(p in msg for p in paths), f"message names no file of the stream: {msg!r}"
    if isinstance(err, BadInputError):
        assert case.on_bad_rows == "error", f"on_bad_rows='skip' did not skip: {msg!r}"
        assert err.path in paths, (err.path, paths)
        if case.fmt in LINE_FORMATS and not isinstance(err, WHOLE_FILE_ERRORS):
            assert err.line is not None or err.row is not None, f"no line named: {msg!r}"


def fuzz_one(reg, root: str, case: Case) -> str:
    """``run_case`` in a fresh directory under ``root``; the directory and the case's
    stream (its staged data) are removed afterwards."""
    case_dir = tempfile.mkdtemp(dir=root)
    try:
        return run_case(reg, case_dir, case)
    finally:
        shutil.rmtree(case_dir, ignore_errors=True)
        for spec in reg.list():
            reg.remove(spec.name)


def run_case(reg, root: str, case: Case) -> str:
    """Drive one case through the real ingest path; assert the property; return the outcome
    (``ok`` or the error class name)."""
    name = f"f{next(_names)}"
    base = os.path.join(root, name)
    drop = os.path.join(base, "drop")
    os.makedirs(drop)
    good = os.path.join(drop, "a-good" + case.ext)
    good_docs = ["first good document", "second good document"]
    with open(good, "wb") as f:
        f.write(valid_bytes(case.fmt, case.mode, good_docs))
    source = {"file": good, "drop": drop, "glob": os.path.join(drop, "*" + case.ext)}[case.layout]
    reg.add(name, source, case.fmt, text_mode=case.mode, on_bad_rows=case.on_bad_rows, holdout=0.0)
    first = reg.ingest(name, None, stage=True)
    want = expected_docs(case.fmt, case.mode, good_docs)
    assert docs_of(first.train_tokens) == want
    cursor = first.new_cursor
    # the hostile bytes: the single file rewritten, or new files in the drop folder
    hostile = case.hostile()
    paths = [good]
    if case.layout == "file":
        with open(good, "wb") as f:
            f.write(hostile)
    else:
        for i, data in enumerate([hostile, *case.extra]):
            p = os.path.join(drop, f"b{i}{case.ext}")
            with open(p, "wb") as f:
                f.write(data)
            paths.append(p)
    before, staged, spec = copy.deepcopy(cursor), _staged_rows(reg, name), reg.get(name)
    try:
        res = reg.ingest(name, cursor, stage=True)
    except Exception as err:  # noqa: BLE001 - the property is about which exceptions escape
        check_error(err, case, paths)
        assert cursor == before, "ingest changed the cursor it was given"
        assert _staged_rows(reg, name) == staged, "a failed ingest staged data"
        assert reg.get(name) == spec, "a failed ingest changed the registration"
        EXAMPLES.setdefault(type(err).__name__, str(err).replace(root, "…"))
        return type(err).__name__
    assert cursor == before
    check_result(reg, name, case, res, paths, hostile)
    return "ok"


def check_result(reg, name: str, case: Case, res, paths: list[str], hostile: bytes) -> None:
    """A clean ingest is consistent: every file read to its end, blank documents dropped,
    nothing new when read again from its cursor, and exactly the documents of valid input."""
    assert res.exhausted and res.cursor is not None
    docs = docs_of(res.train_tokens)
    assert len(docs) == res.train_docs and res.heldout_docs == 0
    assert all(d.strip() for d in docs)
    files = res.new_cursor["files"]
    assert set(files) <= set(paths)
    assert all(f["done"] for f in files.values()), files
    if case.on_bad_rows == "error":
        assert res.bad_rows == {}
    again = reg.ingest(name, res.new_cursor, use_staged=False)
    assert again.rows == 0 and again.train_docs == 0 and again.bad_rows == {}, again.summary()
    assert again.new_cursor == res.new_cursor
    if not case.muts and not case.extra:
        want = expected_docs(case.fmt, case.mode, case.docs)
        assert want is None or docs == want, (docs, want)
