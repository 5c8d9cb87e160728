"""SQLAlchemy 2 ORM tables of the expert store, engine setup and the schema-version check.

Portable SQL only (SQLite by default, any SQLAlchemy URL works; tested on SQLite and
PostgreSQL). On SQLite the engine is put in WAL mode with a busy timeout so several
processes can read while one writes, and write transactions start with ``BEGIN IMMEDIATE``
so two writers queue instead of failing late with a snapshot error. On a database server
(PostgreSQL) connections time out instead of hanging on an unreachable host, pooled ones are
pinged before use (a restarted server), :func:`check_reachable` turns a server that cannot
be reached into one line, and JSON values are written as strict JSON: a NaN or infinite
float (a metric that was not measured) is written as null, which the server's JSON type
accepts (SQLite keeps Python's ``NaN``; readers treat both as missing).

Other packages create their own tables on the same engine with their own ``MetaData``;
this module's tables live in :data:`Base.metadata` only.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from typing import Any, ContextManager

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Connection,
    DateTime,
    Engine,
    ForeignKey,
    Integer,
    String,
    Text,
    create_engine,
    event,
    inspect,
    make_url,
    select,
)
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

from .errors import DatabaseUnreachableError, NotAStoreError, OversizedValueError, SchemaVersionError

__all__ = [
    "SCHEMA_VERSION",
    "Base",
    "Meta",
    "Shard",
    "ShardPart",
    "Version",
    "VersionShard",
    "Ref",
    "Reflog",
    "make_engine",
    "check_reachable",
    "create_schema",
    "check_schema",
    "utcnow",
    "WRITE",
    "write_begin",
]

#: Bumped on every change of the tables below; older databases are upgraded on open
#: (:mod:`.migrate`). 2: ``shards.base_id``, ``depth``, ``object_bytes`` (delta shards).
#: 3: ``shard_parts`` (sliced shards, :mod:`.slices`).
SCHEMA_VERSION = 3

#: Execution option that marks a connection as a writer (``BEGIN IMMEDIATE`` on SQLite).
#: A SQLite transaction begun deferred that reads and then writes fails at once with
#: "database is locked" (no busy wait) when another connection wrote in between, so every
#: read-then-write transaction needs it. ``streams`` asks for it by the same name.
WRITE = "begin_immediate"

SQLITE_BUSY_TIMEOUT_MS = 30_000
SERVER_CONNECT_TIMEOUT_S = 10  # PostgreSQL: give up on an unreachable host after this


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    """Declarative base of the store's own tables."""


class Meta(Base):
    """Key/value facts about the store: ``schema_version``, ``store_id``, ``config``."""

    __tablename__ = "meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class Shard(Base):
    """One block of rows of one layer: row keys plus the experts' tensors, as one object.

    A delta shard (``base_id`` set) stores only changed rows; its tensors are those of its
    base shard with the delta applied. ``bytes`` is the loaded (materialised) payload,
    ``object_bytes`` the payload of this row's own object (NULL in rows written by schema 1
    code: equal to ``bytes``).
    """

    __tablename__ = "shards"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    object_hash: Mapped[str] = mapped_column(String(64), index=True)
    layer: Mapped[str] = mapped_column(String(255), index=True)
    row_start: Mapped[int] = mapped_column(Integer)
    row_end: Mapped[int] = mapped_column(Integer)
    n_experts: Mapped[int] = mapped_column(BigInteger)
    dtype: Mapped[str] = mapped_column(String(64))
    bytes: Mapped[int] = mapped_column(BigInteger)  # tensor payload bytes
    frozen: Mapped[bool] = mapped_column(Boolean)
    created_by: Mapped[str | None] = mapped_column(String(255), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    base_id: Mapped[int | None] = mapped_column(ForeignKey("shards.id"), nullable=True, index=True)
    depth: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    object_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    parts: Mapped[list[ShardPart]] = relationship(order_by="ShardPart.position", lazy="selectin")


class ShardPart(Base):
    """A column slice of a sliced shard's split tensors, as its own object (see :mod:`.slices`):
    columns ``[col_start, col_end)`` along dim 1. A sliced shard's own object holds the
    tensors that are not split; its parts, in ``position`` order, tile the columns from 0."""

    __tablename__ = "shard_parts"
    shard_id: Mapped[int] = mapped_column(ForeignKey("shards.id"), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    col_start: Mapped[int] = mapped_column(Integer)
    col_end: Mapped[int] = mapped_column(Integer)
    object_hash: Mapped[str] = mapped_column(String(64), index=True)
    object_bytes: Mapped[int] = mapped_column(BigInteger)  # tensor payload bytes of the part's object


class Version(Base):
    """An immutable snapshot: ordered shards + dense weights + metrics + stream cursors."""

    __tablename__ = "versions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("versions.id"), nullable=True, index=True)
    message: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    dense_hash: Mapped[str] = mapped_column(String(64))
    optimizer_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    cursors: Mapped[dict[str, Any]] = mapped_column(JSON)
    shard_links: Mapped[list[VersionShard]] = relationship(
        order_by="VersionShard.position", lazy="selectin"
    )


class VersionShard(Base):
    """Membership of a shard in a version, with its position in the version's list."""

    __tablename__ = "version_shards"
    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id"), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    shard_id: Mapped[int] = mapped_column(ForeignKey("shards.id"), index=True)
    shard: Mapped[Shard] = relationship(lazy="joined")


class Ref(Base):
    """A name pointing at a version. ``kind`` is ``"ref"`` (movable) or ``"tag"`` (fixed)."""

    __tablename__ = "refs"
    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id"))
    kind: Mapped[str] = mapped_column(String(8), default="ref")


class Reflog(Base):
    """Every move of every ref: old and new version, when, who, why."""

    __tablename__ = "reflog"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    ref: Mapped[str] = mapped_column(String(255), index=True)
    old: Mapped[int | None] = mapped_column(Integer, nullable=True)
    new: Mapped[int] = mapped_column(Integer)
    when: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    who: Mapped[str] = mapped_column(String(255))
    why: Mapped[str] = mapped_column(Text)


def write_begin(engine: Engine) -> ContextManager[Connection]:
    """``engine.begin()`` for a write transaction (``BEGIN IMMEDIATE`` on SQLite: it waits
    for the write lock up to the busy timeout instead of failing midway)."""
    return engine.execution_options(**{WRITE: True}).begin()


def _configure_sqlite(engine: Engine) -> None:
    """WAL, busy timeout, foreign keys, and BEGIN IMMEDIATE for writers (pysqlite)."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we emit BEGIN ourselves
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys = ON")
        try:
            cursor.execute("PRAGMA journal_mode = WAL")  # persistent; a no-op once set
        except dbapi_connection.OperationalError:
            pass  # read-only file: readers still work in the mode it has
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        immediate = conn.get_execution_options().get(WRITE, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets WAL, busy timeout and immediate write locks, a
    server gets a connect timeout and pre-ping. :class:`DatabaseUnreachableError` for a URL
    that cannot be parsed or whose driver is not installed."""
    try:
        parsed = make_url(url)
        if parsed.get_backend_name() == "sqlite":
            engine = create_engine(parsed, json_deserializer=bounded_json)
            _configure_sqlite(engine)
            return engine
        connect_args: dict[str, Any] = {}
        if parsed.get_backend_name() == "postgresql" and "connect_timeout" not in parsed.query:
            connect_args["connect_timeout"] = SERVER_CONNECT_TIMEOUT_S
        json_args: dict[str, Any] = {"json_serializer": strict_json}
        if parsed.get_backend_name() in ("postgresql", "mysql", "mariadb"):  # dialects that take a deserializer
            json_args["json_deserializer"] = bounded_json
        return create_engine(parsed, pool_pre_ping=True, connect_args=connect_args, **json_args)
    except (NoSuchModuleError, ImportError) as exc:  # an unknown dialect, a driver not installed
        extra = " (pip install 'lifelong[postgresql]')" if "postgres" in str(url) else ""
        raise DatabaseUnreachableError(f"cannot use database URL {_shown(make_url(url))}: {exc}{extra}") from exc
    except ArgumentError as exc:
        raise DatabaseUnreachableError(f"invalid database URL: {exc}") from exc


#: Largest JSON value (a version's metrics, config or cursors; any JSON column on the engine)
#: the store parses, in bytes of text; a larger one is refused unparsed (and refused at commit).
MAX_JSON_BYTES = 64 * 2**20


def bounded_json(text: str | bytes) -> Any:
    """``json.loads`` of a JSON column's text, refusing text over :data:`MAX_JSON_BYTES`
    (:class:`OversizedValueError`): a damaged or hostile database must not make the process
    build a structure of gigabytes."""
    if len(text) > MAX_JSON_BYTES:
        raise OversizedValueError(
            f"a JSON value in the store database is {len(text) / 2**20:.1f} MiB, over the "
            f"{MAX_JSON_BYTES / 2**20:.0f} MiB the store parses; refusing to load it (a damaged or hostile database?)"
        )
    return json.loads(text)


def strict_json(value: Any) -> str:
    """JSON text without ``NaN``/``Infinity`` (not JSON; PostgreSQL refuses them): null instead."""
    try:
        return json.dumps(value, allow_nan=False)
    except ValueError:
        return json.dumps(_finite(value), allow_nan=False)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _shown(url: Any) -> str:
    """A URL for messages: no password, no query (connection options)."""
    return url.set(query={}).render_as_string(hide_password=True)


def check_reachable(engine: Engine) -> None:
    """Raise a one-line :class:`DatabaseUnreachableError` when the database server cannot be
    reached (refused, unknown host, timeout, unknown database or role). SQLite files are
    checked where they are opened."""
    if engine.dialect.name == "sqlite":
        return
    try:
        with engine.connect():
            pass
    except DBAPIError as exc:
        raise DatabaseUnreachableError(f"cannot reach database {_shown(engine.url)}: {_reason(exc)}") from exc


def _reason(exc: DBAPIError) -> str:
    """The driver's message in a few words: ``connection refused``, ``database "x" does
    not exist``."""
    lines = str(exc.orig).strip().splitlines() or [type(exc.orig).__name__]
    reason = lines[0].rsplit("failed: ", 1)[-1].strip()
    reason = reason.removeprefix("FATAL:").strip()
    return reason[:1].lower() + reason[1:]


def create_schema(engine: Engine, store_id: str, config: dict[str, Any]) -> None:
    """Create the tables and record schema version, store id and store config."""
    Base.metadata.create_all(engine)
    with Session(engine.execution_options(**{WRITE: True})) as session, session.begin():
        session.add_all(
            [
                Meta(key="schema_version", value=str(SCHEMA_VERSION)),
                Meta(key="store_id", value=store_id),
                Meta(key="config", value=json.dumps(config, sort_keys=True)),
            ]
        )


def read_meta(engine: Engine) -> dict[str, str]:
    """All meta rows; :class:`NotAStoreError` when the database has no store tables."""
    try:
        if not inspect(engine).has_table(Meta.__tablename__):
            raise NotAStoreError(f"database {engine.url!r} holds no expert store (no meta table)")
        with Session(engine) as session:
            return {row.key: row.value for row in session.scalars(select(Meta))}
    except OperationalError as exc:
        raise NotAStoreError(f"cannot read store database {engine.url!r}: {exc.orig}") from exc


def check_schema(meta: dict[str, str]) -> int:
    """The database's schema version; refuse one that is missing, unknown or newer than
    this code. An older one is returned (the caller upgrades it, see :mod:`.migrate`)."""
    raw = meta.get("schema_version")
    try:
        found = int(raw) if raw is not None else None
    except ValueError:
        found = None
    if found is None:
        raise SchemaVersionError(f"store database has an unreadable schema version {raw!r}")
    if found > SCHEMA_VERSION:
        raise SchemaVersionError(
            f"store database has schema version {found}, newer than this code's "
            f"{SCHEMA_VERSION}; upgrade expert_store to open it"
        )
    if found < 1:
        raise SchemaVersionError(f"store database has unknown schema version {found}")
    return found
