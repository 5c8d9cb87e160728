"""The databases the test-suite runs against: SQLite and PostgreSQL, one fixture for both.

Like dulwich's object-store tests (one test mixin, one subclass per backend), every test
that asks for the ``backend`` fixture (directly, or through a fixture such as the expert
store tests' ``store``) runs once per backend, with the ids ``sqlite`` and ``postgresql``::

    pytest -k postgresql        # only the PostgreSQL variants
    pytest -k sqlite            # only the SQLite ones

SQLite: the store's default database file inside the test's ``tmp_path``.
PostgreSQL: the server at ``$LIFELONG_TEST_PG_URL`` (default
``postgresql+psycopg://postgres@127.0.0.1:5432/test``). Each test gets a fresh schema of
its own (``lt_<unix time>_<pid>_<random>``, put first on the connection's ``search_path``
through the URL's ``options``) that is dropped afterwards, so parallel runs on one database
never see each other's tables; schemas left behind by killed runs are dropped by the next
session after an hour.

Without a reachable server the PostgreSQL variants are skipped with a message that says how
to run them; under CI (``CI=true``) they fail instead.

Tests that reach into the SQLite file itself carry ``@pytest.mark.sqlite_only``.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import make_url

__all__ = ["PG_URL_ENV", "DEFAULT_PG_URL", "IDS", "Backend", "ids_for", "postgresql_url", "pg_schema", "under_ci"]

PG_URL_ENV = "LIFELONG_TEST_PG_URL"
DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
IDS = ("sqlite", "postgresql")
SCHEMA_PREFIX = "lt_"
STALE_SCHEMA_S = 3600  # schemas of killed runs older than this are dropped at session start
CONNECT_TIMEOUT_S = 3


@dataclass(frozen=True)
class Backend:
    """One database backend for one test.

    ``url`` is what the store takes (``ExpertStore.init(path, url=...)``, ``--url``): None
    on SQLite, where the store keeps its default ``store.db``; on PostgreSQL the URL of the
    test's own schema.
    """

    name: str  # "sqlite" | "postgresql"
    url: str | None
    tmp_path: Path

    def engine_url(self, sqlite_file: str = "test.db") -> str:
        """A URL for a bare engine (streams registry, lifelong records): a SQLite file in
        ``tmp_path``, or the test's PostgreSQL schema."""
        return self.url if self.url is not None else f"sqlite:///{self.tmp_path / sqlite_file}"

    def cli_flags(self) -> list[str]:
        """``lifelong`` flags that point a command at this database (none on SQLite)."""
        return [] if self.url is None else ["--url", self.url]


def under_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def ids_for(node: Any) -> list[str]:
    """The backends a test runs on: both, or SQLite alone for ``sqlite_only`` tests."""
    return ["sqlite"] if node.get_closest_marker("sqlite_only") else list(IDS)


# ---------------------------------------------------------------------------- PostgreSQL
def _conninfo(url: str) -> str:
    """A libpq URI (``postgresql://...``) for psycopg from a SQLAlchemy URL."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _how_to_run(url: str, why: str) -> str:
    return (
        f"PostgreSQL tests need a server at {make_url(url).render_as_string(hide_password=True)} ({why}); "
        f"start one (`.ci/run` starts the local one; by hand: pg_ctlcluster <version> main start) "
        f"or set {PG_URL_ENV}=postgresql+psycopg://USER@HOST:PORT/DB (a database where USER may create schemas)"
    )


_probe: dict[str, str | None] = {}  # url -> None (reachable) or why not, probed once a session


def postgresql_url() -> str:
    """The server's base URL; skips the calling test (fails it under CI) when unreachable."""
    url = os.environ.get(PG_URL_ENV) or DEFAULT_PG_URL
    if url not in _probe:
        _probe[url] = _reach(url)
    why = _probe[url]
    if why is not None:
        message = _how_to_run(url, why)
        if under_ci():
            pytest.fail(f"CI=true and {message}", pytrace=False)
        pytest.skip(message)
    return url


def _reach(url: str) -> str | None:
    try:
        import psycopg
    except ImportError:
        return "psycopg is not installed: pip install -e '.[dev]'"
    try:
        with psycopg.connect(_conninfo(url), connect_timeout=CONNECT_TIMEOUT_S, autocommit=True) as conn:
            _drop_stale_schemas(conn)
    except psycopg.Error as exc:  # "connection refused", 'database "x" does not exist'
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        why = first.rsplit("failed: ", 1)[-1].removeprefix("FATAL:").strip()
        return why[:1].lower() + why[1:]
    return None


def _drop_stale_schemas(conn: Any) -> None:
    """Drop ``lt_<time>_...`` schemas more than an hour old (their run was killed)."""
    now = int(time.time())
    rows = conn.execute("SELECT nspname FROM pg_namespace WHERE nspname LIKE %s", (SCHEMA_PREFIX + "%",)).fetchall()
    for (name,) in rows:
        stamp = name[len(SCHEMA_PREFIX):].split("_", 1)[0]
        if stamp.isdigit() and now - int(stamp) > STALE_SCHEMA_S:
            try:
                conn.execute("SET lock_timeout = '2s'")
                conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
            except Exception:  # noqa: BLE001 - another session may be dropping it too
                pass


@contextmanager
def pg_schema(base_url: str) -> Iterator[str]:
    """A fresh schema on the server at ``base_url``; yields a URL whose connections use it.

    Dropped on exit (connections still open in it only delay that: ``lock_timeout``)."""
    import psycopg

    name = f"{SCHEMA_PREFIX}{int(time.time())}_{os.getpid()}_{secrets.token_hex(4)}"
    with psycopg.connect(_conninfo(base_url), connect_timeout=CONNECT_TIMEOUT_S, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{name}"')
    url = make_url(base_url).update_query_dict({"options": f"-csearch_path={name}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with psycopg.connect(_conninfo(base_url), connect_timeout=CONNECT_TIMEOUT_S, autocommit=True) as conn:
            try:
                conn.execute("SET lock_timeout = '10s'")
                conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
            except psycopg.errors.LockNotAvailable:
                pass  # a connection the test leaked still uses it: the next session drops it
