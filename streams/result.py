"""Plain data returned by the registry: ``IngestResult``, ``FileReport``, ``Pending``,
``HeldOut``, ``StreamInfo`` — each with ``to_dict()`` (JSON-ready, no arrays)."""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .packing import pack_blocks
from .tokenizer import PAD_ID

MAX_EXAMPLES = 20  # bad-row messages kept per result


@dataclass
class FileReport:
    """What one ingest did with one file.

    status: ``new`` (first read), ``resumed`` (continued from the cursor), ``changed``
    (sha256 differs from the cursor's; see ``action``), ``bad`` (skipped as a whole).
    action for changed files: ``reread`` (read again from row 0 as new data) or ``skip``.
    """

    path: str
    status: str
    rows: int = 0
    docs: int = 0
    done: bool = False
    action: str | None = None
    old_sha256: str | None = None
    new_sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class IngestResult:
    """Data new relative to ``cursor``, tokenized; ``new_cursor`` is NOT committed.

    ``train_tokens``/``heldout_tokens`` are flat arrays, every document followed by EOS.
    ``exhausted`` is True when nothing pending was left unread (no budget stop).
    """

    stream: str
    cursor: dict[str, Any] | None
    new_cursor: dict[str, Any]
    train_tokens: np.ndarray
    heldout_tokens: np.ndarray
    train_docs: int = 0
    heldout_docs: int = 0
    rows: int = 0
    bytes: int = 0
    bad_rows: dict[str, int] = field(default_factory=dict)
    bad_examples: list[str] = field(default_factory=list)
    files: list[FileReport] = field(default_factory=list)
    exhausted: bool = True
    from_staging: bool = False

    @property
    def train_token_count(self) -> int:
        return int(self.train_tokens.shape[0])

    @property
    def heldout_token_count(self) -> int:
        return int(self.heldout_tokens.shape[0])

    @property
    def changed_files(self) -> list[FileReport]:
        return [f for f in self.files if f.status == "changed"]

    @property
    def empty(self) -> bool:
        return self.train_docs == 0 and self.heldout_docs == 0

    def blocks(self, block_len: int, *, seed: int | None = 0, pad_id: int = PAD_ID,
               drop_last: bool = False) -> np.ndarray:
        """``pack_blocks`` of the train tokens: ``(n_blocks, block_len + 1)``."""
        return pack_blocks(self.train_tokens, block_len, pad_id=pad_id, seed=seed,
                           drop_last=drop_last)

    def summary(self) -> dict[str, Any]:
        """Counts only (what a version row records about this ingest)."""
        return {"stream": self.stream, "train_docs": self.train_docs,
                "heldout_docs": self.heldout_docs, "train_tokens": self.train_token_count,
                "heldout_tokens": self.heldout_token_count, "rows": self.rows,
                "bytes": self.bytes, "bad_rows": dict(self.bad_rows),
                "exhausted": self.exhausted, "from_staging": self.from_staging}

    def to_dict(self) -> dict[str, Any]:
        return {**self.summary(), "cursor": self.cursor, "new_cursor": self.new_cursor,
                "bad_examples": list(self.bad_examples),
                "files": [f.to_dict() for f in self.files]}

    @classmethod
    def merge(cls, parts: list["IngestResult"]) -> "IngestResult":
        """One result covering consecutive chunks (first cursor .. last new_cursor)."""
        first, last = parts[0], parts[-1]
        bad: Counter[str] = Counter()
        examples: list[str] = []
        files: dict[str, FileReport] = {}
        for p in parts:
            bad.update(p.bad_rows)
            examples.extend(p.bad_examples)
            for f in p.files:
                if f.path in files:
                    prev = files[f.path]
                    prev.rows += f.rows
                    prev.docs += f.docs
                    prev.done = f.done
                else:
                    files[f.path] = FileReport(**f.to_dict())
        cat = (lambda xs: np.concatenate(xs) if len(xs) > 1 else xs[0])
        return cls(stream=first.stream, cursor=first.cursor, new_cursor=last.new_cursor,
                   train_tokens=cat([p.train_tokens for p in parts]),
                   heldout_tokens=cat([p.heldout_tokens for p in parts]),
                   train_docs=sum(p.train_docs for p in parts),
                   heldout_docs=sum(p.heldout_docs for p in parts),
                   rows=sum(p.rows for p in parts), bytes=sum(p.bytes for p in parts),
                   bad_rows=dict(bad), bad_examples=examples[:MAX_EXAMPLES],
                   files=list(files.values()), exhausted=last.exhausted)


@dataclass
class Pending:
    """Estimate of the data waiting after a cursor (``None`` where unknown, e.g. hub).

    ``tokens`` assumes the byte tokenizer (bytes + one EOS per document); for JSON/CSV
    the bytes include syntax, so it is an upper bound.
    """

    stream: str
    files: int = 0
    new_files: int = 0
    changed_files: list[str] = field(default_factory=list)
    bytes: int | None = 0
    docs: int | None = 0
    tokens: int | None = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class HeldOut:
    """Held-out documents of a stream seen so far (first-seen order), tokenized."""

    stream: str
    tokens: np.ndarray
    docs: int

    def to_dict(self) -> dict[str, Any]:
        return {"stream": self.stream, "docs": self.docs, "tokens": int(self.tokens.shape[0])}


@dataclass
class StagedInfo:
    """One staged (read-ahead) ingest."""

    stream: str
    key: str
    from_cursor: dict[str, Any] | None
    to_cursor: dict[str, Any]
    summary: dict[str, Any]
    created_at: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class StreamInfo:
    """Everything ``lifelong stream show NAME`` prints."""

    spec: dict[str, Any]
    pending: Pending | None
    heldout_docs: int
    staged: list[StagedInfo]
    heldout_warning: str | None = None  # ``StreamRegistry.heldout_warning``

    def to_dict(self) -> dict[str, Any]:
        return {"spec": self.spec, "pending": self.pending.to_dict() if self.pending else None,
                "heldout_docs": self.heldout_docs,
                "staged": [s.to_dict() for s in self.staged],
                "heldout_warning": self.heldout_warning}
