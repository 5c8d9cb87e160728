"""A store on disk: the marker file, the default database file, the objects directory.

Layout::

    <path>/store.json      marker: format, store id, where the database is
    <path>/store.db        SQLite database (unless a URL was given)
    <path>/objects/ab/...  content-addressed safetensors objects

:func:`create` makes a new store there and :func:`connect` opens an existing one; both
return a :class:`Connected` from which :class:`~expert_store.store.ExpertStore` is built.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError

from .errors import NotAStoreError, ReadOnlyStoreError, StoreError, StoreExistsError
from .migrate import read_old_schema, upgrade
from .objects import atomic_write, is_read_only_error
from .schema import SCHEMA_VERSION, check_schema, create_schema, make_engine, read_meta
from .validation import check_json

__all__ = ["MARKER", "FORMAT", "DB_FILE", "OBJECTS_DIR", "Connected", "create", "connect",
           "read_only_guard"]

MARKER = "store.json"
FORMAT = "expert_store"
DB_FILE = "store.db"
OBJECTS_DIR = "objects"


@dataclass(frozen=True)
class Connected:
    """What a store is built from. ``database`` is the marker's ``"default"`` or ``"url"``."""

    path: Path
    engine: Engine
    config: dict[str, Any]
    store_id: str
    read_only: bool
    database: str


def create(path: Path, config: dict[str, Any] | None, url: str | None) -> Connected:
    """Create a new store at ``path`` (see :meth:`ExpertStore.init`)."""
    config = check_json("config", config)
    if (path / MARKER).exists():
        raise StoreExistsError(f"{path} already holds an expert store; open it instead")
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise StoreExistsError(f"{path} exists and is not an empty directory; refusing to init a store there")
    try:
        (path / OBJECTS_DIR).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if not is_read_only_error(exc):
            raise
        raise ReadOnlyStoreError(f"cannot create a store at {path}: {exc.strerror}") from exc
    engine = make_engine(url or f"sqlite:///{path / DB_FILE}")
    try:
        read_meta(engine)
    except NotAStoreError:
        pass
    else:
        engine.dispose()
        raise StoreExistsError(f"database {engine.url!r} already holds an expert store")
    store_id = uuid.uuid4().hex
    with read_only_guard(path):
        create_schema(engine, store_id, config)
    database = "default" if url is None else "url"
    marker = {"format": FORMAT, "store_id": store_id, "database": database}
    atomic_write(path / MARKER, json.dumps(marker, indent=2).encode() + b"\n")
    return Connected(path, engine, config, store_id, False, database)


def _read_marker(path: Path) -> dict[str, Any]:
    try:
        marker = json.loads((path / MARKER).read_text())
    except FileNotFoundError as exc:
        raise NotAStoreError(f"{path} is not an expert store (no {MARKER}); create one with init") from exc
    except (OSError, ValueError) as exc:
        raise NotAStoreError(f"{path / MARKER} is unreadable: {exc}") from exc
    if not isinstance(marker, dict) or marker.get("format") != FORMAT:
        raise NotAStoreError(f"{path / MARKER} is not an expert store marker")
    return marker


def connect(path: Path, url: str | None, read_only: bool) -> Connected:
    """Open the store at ``path`` (see :meth:`ExpertStore.open`)."""
    marker = _read_marker(path)
    database = "url" if marker.get("database") == "url" else "default"
    if database == "url" and url is None:
        raise NotAStoreError(f"the store at {path} keeps its database elsewhere: pass its url")
    if url is None and not (path / DB_FILE).is_file():
        raise NotAStoreError(f"{path} has a {MARKER} but no {DB_FILE}; the store's database is missing")
    if url is None and not read_only and not _writable(path):
        read_only = True
    if url is None and read_only:
        # mode=ro never writes. On a read-only directory without WAL side files (the
        # last writer closed cleanly) SQLite can only open the file as immutable.
        db = path / DB_FILE
        side_files = Path(f"{db}-wal").exists() and Path(f"{db}-shm").exists()
        immutable = "&immutable=1" if not side_files and not _writable(path) else ""
        url = f"sqlite:///file:{db}?mode=ro{immutable}&uri=true"
    engine = make_engine(url or f"sqlite:///{path / DB_FILE}")
    try:
        meta = read_meta(engine)
        found = check_schema(meta)
        if meta.get("store_id") != marker.get("store_id"):
            raise NotAStoreError(f"database {engine.url!r} belongs to another store than {path}")
        if found < SCHEMA_VERSION:
            engine, read_only = _upgrade_or_read_old(path, engine, found, read_only)
    except StoreError:
        engine.dispose()
        raise
    return Connected(path, engine, json.loads(meta.get("config", "{}")), marker["store_id"],
                     read_only, database)


def _upgrade_or_read_old(path: Path, engine: Engine, found: int, read_only: bool) -> tuple[Engine, bool]:
    """Upgrade an older database in place; read-only (or unwritable), read it as it is."""
    if not read_only:
        try:
            with read_only_guard(path):
                upgrade(engine)
            return engine, False
        except ReadOnlyStoreError:
            read_only = True  # SQLite refuses to write it: open for reading
    fresh = make_engine(engine.url.render_as_string(hide_password=False))
    engine.dispose()
    try:
        read_old_schema(fresh, found)
    except StoreError:
        fresh.dispose()
        raise
    return fresh, read_only


def _writable(path: Path) -> bool:
    """Whether files can be created in ``path`` (honest for root too, unlike ``os.access``)."""
    probe = path / f".write-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except OSError:
        return False
    probe.unlink(missing_ok=True)
    return True


@contextmanager
def read_only_guard(path: Path) -> Iterator[None]:
    """Turn 'cannot write the database' into :class:`ReadOnlyStoreError`."""
    try:
        yield
    except OperationalError as exc:
        text = str(exc.orig).lower()
        if "readonly" in text or "read-only" in text or "unable to open" in text:
            raise ReadOnlyStoreError(f"the store database at {path} cannot be written: {exc.orig}; the store is unchanged") from exc
        raise
