"""A stream's resumable position, as opaque JSON owned by a model version.

Shape (version 1)::

    {"v": 1,
     "files": {"/abs/path/a.jsonl": {"size": 123, "sha256": "…", "rows": 40,
                                     "bytes": 4000, "done": true}, …},
     "rows": 0}

``files`` is used by file sources: for each file the rows (datasets rows: lines,
paragraphs, files, JSON/CSV/Parquet records) already consumed, the UTF-8 bytes of their
text, whether the file was read to its end, and the size and sha256 it had then (a
different sha256 later means the file was rewritten). ``rows`` is the row offset of a
hub dataset. Callers store the JSON as is and hand it back; ``None`` means "from the
beginning". ``ingest`` never changes a cursor in place; it returns a new one.
"""
from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import CursorError

CURSOR_VERSION = 1


@dataclass
class FileCursor:
    """Position inside one file."""

    size: int
    sha256: str
    rows: int = 0
    bytes: int = 0
    done: bool = False


@dataclass
class Cursor:
    """Parsed cursor; ``Cursor.from_json(None)`` is the beginning of the stream."""

    files: dict[str, FileCursor] = field(default_factory=dict)
    rows: int = 0

    @classmethod
    def from_json(cls, data: dict[str, Any] | str | None) -> "Cursor":
        if data is None:
            return cls()
        try:
            if isinstance(data, str):
                data = json.loads(data)
            if not isinstance(data, dict) or data.get("v") != CURSOR_VERSION:
                raise ValueError(f"expected an object with v={CURSOR_VERSION}")
            files = {str(p): FileCursor(**fc) for p, fc in data.get("files", {}).items()}
            return cls(files=files, rows=int(data.get("rows", 0)))
        except (ValueError, TypeError, AttributeError) as exc:
            raise CursorError(f"invalid stream cursor: {exc}") from exc

    def to_json(self) -> dict[str, Any]:
        return {"v": CURSOR_VERSION,
                "files": {p: asdict(fc) for p, fc in sorted(self.files.items())},
                "rows": self.rows}

    def copy(self) -> "Cursor":
        return copy.deepcopy(self)


def cursor_key(*parts: Any) -> str:
    """sha256 of the canonical JSON of ``parts`` (keys staged data by cursor and options)."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()
