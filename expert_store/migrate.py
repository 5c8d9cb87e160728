"""Upgrade a store database written by older code, in place, when the store is opened.

Each step adds what a schema version introduced, with portable ``ALTER TABLE ... ADD
COLUMN`` statements that skip columns already present, so a step interrupted on a database
without transactional DDL simply runs again. The steps and the ``schema_version`` bump run
in one write transaction that first locks the ``meta`` row (``BEGIN IMMEDIATE`` on
SQLite, ``SELECT ... FOR UPDATE`` on PostgreSQL, where the DDL is transactional too), so
two processes (or hosts) opening an old store at once upgrade it once: the second reads the
new version once the first commits, and runs no step.

A store opened read-only cannot be upgraded. On SQLite it is read through per-connection
temporary views that add the new columns with their defaults (nothing in the file
changes); on other databases opening it read-only is refused until a writable open has
upgraded it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import Connection, Engine, event, inspect, select, update

from .errors import SchemaVersionError
from .schema import SCHEMA_VERSION, WRITE, Meta, Shard, ShardPart

__all__ = ["upgrade", "read_old_schema"]


def _v1_to_v2(conn: Connection) -> None:
    """Delta shards: ``shards.base_id`` (+ index), ``depth``, ``object_bytes``."""
    present = {c["name"] for c in inspect(conn).get_columns("shards")}
    if "base_id" not in present:
        conn.exec_driver_sql("ALTER TABLE shards ADD COLUMN base_id INTEGER REFERENCES shards (id)")
    if "depth" not in present:
        conn.exec_driver_sql("ALTER TABLE shards ADD COLUMN depth INTEGER DEFAULT 0 NOT NULL")
    if "object_bytes" not in present:
        conn.exec_driver_sql("ALTER TABLE shards ADD COLUMN object_bytes BIGINT")
    conn.execute(update(Shard).where(Shard.object_bytes.is_(None)).values(object_bytes=Shard.bytes))
    for index in Shard.__table__.indexes:
        if [c.name for c in index.columns] == ["base_id"]:
            index.create(conn, checkfirst=True)


def _v2_to_v3(conn: Connection) -> None:
    """Sliced shards: the ``shard_parts`` table (+ its index)."""
    ShardPart.__table__.create(conn, checkfirst=True)
    for index in ShardPart.__table__.indexes:
        index.create(conn, checkfirst=True)


#: ``{version: step}``: the step that upgrades a database of ``version`` to ``version + 1``.
STEPS: dict[int, Callable[[Connection], None]] = {1: _v1_to_v2, 2: _v2_to_v3}


def upgrade(engine: Engine) -> int:
    """Bring the database up to :data:`SCHEMA_VERSION`; returns the version it had."""
    with engine.execution_options(**{WRITE: True}).begin() as conn:
        found = int(conn.execute(
            select(Meta.value).where(Meta.key == "schema_version").with_for_update()
        ).scalar_one())
        for version in range(found, SCHEMA_VERSION):
            STEPS[version](conn)
        if found < SCHEMA_VERSION:
            conn.execute(update(Meta).where(Meta.key == "schema_version").values(value=str(SCHEMA_VERSION)))
    return found


#: Per version: SQL of temporary views that present its tables with today's columns.
_NO_PARTS = ("CREATE TEMP VIEW IF NOT EXISTS shard_parts AS SELECT 0 AS shard_id, 0 AS position, 0 AS col_start, "
             "0 AS col_end, '' AS object_hash, 0 AS object_bytes WHERE 0")
_SQLITE_VIEWS: dict[int, list[str]] = {
    1: [("CREATE TEMP VIEW IF NOT EXISTS shards AS SELECT *, NULL AS base_id, 0 AS depth, "
         "bytes AS object_bytes FROM main.shards"), _NO_PARTS],
    2: [_NO_PARTS],
}


def read_old_schema(engine: Engine, found: int) -> None:
    """Let this (read-only) engine read a database of schema ``found`` without changing it."""
    if engine.dialect.name != "sqlite" or found not in _SQLITE_VIEWS:
        raise SchemaVersionError(
            f"store database has schema version {found} (this code: {SCHEMA_VERSION}); open it "
            "once for writing to upgrade it in place, then it can be opened read-only"
        )

    @event.listens_for(engine, "connect")
    def _views(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        for sql in _SQLITE_VIEWS[found]:
            cursor.execute(sql)
        cursor.close()
