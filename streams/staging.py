"""Database-side state that is not a cursor: staged (read-ahead) tokens and the held-out
documents seen so far. Staged rows are written in one transaction, so a crash leaves
either a complete row or none; they never move a cursor. A write that fails (disk full, an
I/O error) raises :class:`~streams.errors.StreamWriteError` saying so, in one line."""
from __future__ import annotations

import io
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import numpy as np
from sqlalchemy import Engine, delete, func, insert, select
from sqlalchemy.exc import IntegrityError

from .fsutil import write_errors
from .result import IngestResult, StagedInfo
from .schema import stream_heldout, stream_staged, write_begin
from .split import doc_hash

#: What a failed ingest leaves: staged data is one transaction, cursors belong to versions.
NOTHING_STAGED = "nothing was staged and no cursor moved"


def _pack(res: IngestResult) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, train=res.train_tokens, heldout=res.heldout_tokens)
    return buf.getvalue()


def save_staged(engine: Engine, key: str, res: IngestResult) -> None:
    """Store ``res`` under ``(stream, key)`` (replacing an older row with that key)."""
    row = {"stream": res.stream, "key": key, "from_cursor": res.cursor,
           "to_cursor": res.new_cursor, "payload": _pack(res),
           "summary": {**res.summary(), "bad_examples": res.bad_examples,
                       "files": [f.to_dict() for f in res.files]},
           "created_at": datetime.now(timezone.utc)}
    with write_errors(f"saving the staged data of stream {res.stream!r}", NOTHING_STAGED), write_begin(engine) as conn:
        conn.execute(delete(stream_staged).where(stream_staged.c.stream == res.stream,
                                                 stream_staged.c.key == key))
        conn.execute(insert(stream_staged), [row])


def load_staged(engine: Engine, stream: str, key: str) -> IngestResult | None:
    """The staged result under ``(stream, key)``, or None."""
    from .result import FileReport

    with engine.connect() as conn:
        row = conn.execute(select(stream_staged).where(stream_staged.c.stream == stream,
                                                       stream_staged.c.key == key)).first()
    if row is None:
        return None
    arrays = np.load(io.BytesIO(row.payload))
    s = dict(row.summary)
    return IngestResult(
        stream=stream, cursor=row.from_cursor, new_cursor=row.to_cursor,
        train_tokens=arrays["train"], heldout_tokens=arrays["heldout"],
        train_docs=s["train_docs"], heldout_docs=s["heldout_docs"], rows=s["rows"],
        bytes=s["bytes"], bad_rows=s["bad_rows"], bad_examples=s["bad_examples"],
        files=[FileReport(**f) for f in s["files"]], exhausted=s["exhausted"],
        from_staging=True)


def list_staged(engine: Engine, stream: str) -> list[StagedInfo]:
    cols = [stream_staged.c[c] for c in ("stream", "key", "from_cursor", "to_cursor",
                                         "summary", "created_at")]
    with engine.connect() as conn:
        rows = conn.execute(select(*cols).where(stream_staged.c.stream == stream)
                            .order_by(stream_staged.c.id)).all()
    return [StagedInfo(r.stream, r.key, r.from_cursor, r.to_cursor,
                       {k: v for k, v in r.summary.items() if k not in ("files", "bad_examples")},
                       r.created_at.isoformat()) for r in rows]


def clear_staged(engine: Engine, stream: str, key: str | None = None) -> int:
    """Delete the stream's staged rows (or the one with ``key``); returns how many."""
    stmt = delete(stream_staged).where(stream_staged.c.stream == stream)
    if key is not None:
        stmt = stmt.where(stream_staged.c.key == key)
    with write_errors(f"clearing the staged data of stream {stream!r}",
                      "it stays staged (keyed by its cursor, it is never used for other data)"), write_begin(engine) as conn:
        return conn.execute(stmt).rowcount


def add_heldout(engine: Engine, stream: str, docs: list[str]) -> None:
    """Record held-out documents (idempotent by content hash; first-seen order kept)."""
    rows: dict[str, dict[str, Any]] = {}
    for d in docs:
        h = doc_hash(d)
        rows.setdefault(h, {"stream": stream, "sha1": h, "text": d})
    for _ in range(3):  # a concurrent ingest may insert the same docs first: retry
        try:
            # Read, then insert in a transaction that writes first: on SQLite (WAL) a transaction
            # that read before another connection committed cannot write ("database is locked" at
            # once, whatever the busy timeout). A race is caught by the unique key and retried.
            with write_errors(f"recording held-out documents of stream {stream!r}", NOTHING_STAGED):
                with engine.connect() as conn:
                    have = set(conn.execute(select(stream_heldout.c.sha1).where(
                        stream_heldout.c.stream == stream,
                        stream_heldout.c.sha1.in_(list(rows)))).scalars())
                new = [r for h, r in rows.items() if h not in have]
                if new:
                    with write_begin(engine) as conn:
                        conn.execute(insert(stream_heldout), new)
            return
        except IntegrityError:
            continue


def get_heldout(engine: Engine, stream: str, max_docs: int | None = None) -> list[str]:
    stmt = (select(stream_heldout.c.text).where(stream_heldout.c.stream == stream)
            .order_by(stream_heldout.c.id))
    if max_docs is not None:
        stmt = stmt.limit(max_docs)
    with engine.connect() as conn:
        return list(conn.execute(stmt).scalars())


def heldout_size(engine: Engine, stream: str, count_tokens: Callable[[str], int],
                 enough: int | None = None) -> tuple[int, int]:
    """``(documents, tokens)`` of the stream's held-out set; tokens (``count_tokens`` of
    each text, EOS included) are counted in first-seen order and only until ``enough``."""
    tokens = 0
    with engine.connect() as conn:
        docs = conn.execute(select(func.count()).select_from(stream_heldout)
                            .where(stream_heldout.c.stream == stream)).scalar_one()
        rows = conn.execution_options(yield_per=64).execute(
            select(stream_heldout.c.text).where(stream_heldout.c.stream == stream)
            .order_by(stream_heldout.c.id))
        for text in rows.scalars():
            tokens += count_tokens(text)
            if enough is not None and tokens >= enough:
                break
        rows.close()
    return docs, tokens
