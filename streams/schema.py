"""The ``streams`` tables, on their own ``MetaData`` (created on the engine given to
``StreamRegistry``; the package never imports the store that owns the engine)."""
from __future__ import annotations

from typing import ContextManager

from sqlalchemy import (JSON, BigInteger, Column, Connection, DateTime, Engine, Float, Integer, LargeBinary,
                        MetaData, String, Table, Text, UniqueConstraint)

metadata = MetaData()

#: Execution option asking the engine for its write lock at BEGIN (``BEGIN IMMEDIATE``):
#: the store's SQLite engines honour it (a deferred transaction that reads, then writes,
#: fails at once with "database is locked" if another connection wrote in between); other
#: engines ignore it.
BEGIN_IMMEDIATE = "begin_immediate"


def write_begin(engine: Engine) -> ContextManager[Connection]:
    """``engine.begin()`` for a transaction that writes."""
    return engine.execution_options(**{BEGIN_IMMEDIATE: True}).begin()

stream_registry = Table(
    "stream_registry", metadata,
    Column("name", String(64), primary_key=True),
    Column("source", JSON, nullable=False),       # str or list of str
    Column("format", String(16), nullable=False),
    Column("options", JSON, nullable=False),      # StreamSpec.options()
    Column("holdout", Float, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

# What the stream knows of each file it has seen: a sha256 cache keyed by (size, mtime).
stream_files = Table(
    "stream_files", metadata,
    Column("stream", String(64), primary_key=True),
    Column("path", String(4096), primary_key=True),
    Column("size", BigInteger, nullable=False),
    Column("mtime_ns", BigInteger, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("first_seen", DateTime(timezone=True), nullable=False),
    Column("last_seen", DateTime(timezone=True), nullable=False),
)

# Tokenized data read ahead of a cycle, keyed by (stream, from-cursor, budget, options).
stream_staged = Table(
    "stream_staged", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("stream", String(64), nullable=False, index=True),
    Column("key", String(64), nullable=False),
    Column("from_cursor", JSON, nullable=True),
    Column("to_cursor", JSON, nullable=False),
    Column("summary", JSON, nullable=False),
    Column("payload", LargeBinary, nullable=False),  # .npz of train/heldout tokens
    Column("created_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("stream", "key", name="uq_stream_staged_key"),
)

# Held-out documents seen so far, in first-seen order (a stable evaluation set).
stream_heldout = Table(
    "stream_heldout", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("stream", String(64), nullable=False, index=True),
    Column("sha1", String(40), nullable=False),
    Column("text", Text, nullable=False),
    UniqueConstraint("stream", "sha1", name="uq_stream_heldout_doc"),
)
