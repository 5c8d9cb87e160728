"""How much new data waits after a cursor: a cheap estimate (stat + cached sha256 + a
newline count of new files), without parsing or tokenizing anything."""
from __future__ import annotations

from typing import Any

from .cursor import Cursor
from .errors import BadInputError
from .fileindex import FileIndex
from .fsutil import CHUNK
from .result import Pending
from .sources import list_files
from .spec import StreamSpec


def _count_docs(path: str, spec: StreamSpec) -> int:
    """Rows a file will yield, estimated (newlines; paragraphs; 1 per file; Parquet meta)."""
    if spec.format == "text" and spec.text_mode == "file":
        return 1
    if spec.format == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    if spec.format == "text" and spec.text_mode == "paragraph":
        return _count_paragraphs(path)
    n, last = 0, b""
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            n += chunk.count(b"\n")
            last = chunk
    n += 0 if last.endswith(b"\n") or not last else 1
    return max(n - (1 if spec.format == "csv" else 0), 0)


def _count_paragraphs(path: str) -> int:
    """Blank-line separators, plus one for text after the last (the text builder's split)."""
    n, tail, last = 0, False, b""
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            buf = last[-1:] + chunk
            k = buf.count(b"\n\n")
            n += k
            tail = bool(buf[buf.rindex(b"\n\n") + 2:]) if k else tail or bool(chunk)
            last = chunk
    return n + (1 if tail else 0)


def pending(spec: StreamSpec, cursor: dict[str, Any] | None, index: FileIndex) -> Pending:
    """Estimate the data after ``cursor``; unknown (``None``) for hub datasets."""
    if spec.format == "hub":
        return Pending(stream=spec.name, bytes=None, docs=None, tokens=None)
    cur = Cursor.from_json(cursor)
    out = Pending(stream=spec.name)
    for path in list_files(spec):
        entry = cur.files.get(path)
        try:
            size, sha = index.identity(path)
            total = _count_docs(path, spec)
        except (BadInputError, OSError, ValueError):  # pyarrow's ArrowInvalid is a ValueError
            continue  # a broken file: reported by ingest, not here
        if entry is not None and entry.sha256 == sha:
            if entry.done:
                continue
            rest_bytes, rest_docs = max(size - entry.bytes, 0), max(total - entry.rows, 0)
        else:
            if entry is not None:
                out.changed_files.append(path)
                if spec.on_changed == "skip":
                    continue
            else:
                out.new_files += 1
            rest_bytes, rest_docs = size, total
        out.files += 1
        out.bytes += rest_bytes
        out.docs += rest_docs
    index.flush()
    out.tokens = out.bytes + out.docs
    return out
