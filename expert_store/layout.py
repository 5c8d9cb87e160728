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
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from .errors import NotAStoreError, ReadOnlyStoreError, StoreError, StoreExistsError
from .ioerrors import read_only_guard, write_guard
from .migrate import read_old_schema, upgrade
from .objects import TEMP_MARKER, atomic_write, is_read_only_error
from .schema import SCHEMA_VERSION, check_reachable, check_schema, create_schema, make_engine, read_meta
from .validation import check_json

__all__ = ["MARKER", "FORMAT", "DB_FILE", "OBJECTS_DIR", "PROBE_PREFIX", "Connected", "create", "connect",
           "read_only_guard", "stale_probes"]

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
    made_dir = not path.exists()
    engine = make_engine(url or f"sqlite:///{path / DB_FILE}")
    database = "default" if url is None else "url"
    try:
        check_reachable(engine)  # before anything is created: a retry finds the directory empty
        with write_guard(f"creating a store at {path}", "no store was created", path):
            (path / OBJECTS_DIR).mkdir(parents=True, exist_ok=True)
            try:
                found = read_meta(engine)
            except NotAStoreError:
                found = {}
            if found.get("store_id"):  # tables without rows: an init that failed half-way
                raise StoreExistsError(f"database {engine.url!r} already holds an expert store")
            store_id = uuid.uuid4().hex
            create_schema(engine, store_id, config)
            marker = {"format": FORMAT, "store_id": store_id, "database": database}
            atomic_write(path / MARKER, json.dumps(marker, indent=2).encode() + b"\n")
    except BaseException:
        engine.dispose()
        if url is None:
            _remove_new(path, made_dir)
        raise
    return Connected(path, engine, config, store_id, False, database)


def _remove_new(path: Path, made_dir: bool) -> None:
    """Undo a failed :func:`create` of a default (SQLite) store, as far as the disk allows:
    the directory was absent or empty, so all it holds now is what create made."""
    for name in (MARKER, DB_FILE, f"{DB_FILE}-wal", f"{DB_FILE}-shm", f"{DB_FILE}-journal"):
        with suppress(OSError):
            (path / name).unlink(missing_ok=True)
    with suppress(OSError):
        for temp in path.glob(f".{MARKER}{TEMP_MARKER}*"):
            temp.unlink()
    with suppress(OSError):
        (path / OBJECTS_DIR).rmdir()
    if made_dir:
        with suppress(OSError):
            path.rmdir()


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
    if url is None and not read_only:
        with write_guard(f"checking that {path} can be written", "nothing was changed", path):
            read_only = not _writable(path)
    if url is None and read_only:
        # mode=ro never writes. On a read-only directory without WAL side files (the
        # last writer closed cleanly) SQLite can only open the file as immutable.
        db = path / DB_FILE
        side_files = Path(f"{db}-wal").exists() and Path(f"{db}-shm").exists()
        immutable = "&immutable=1" if not side_files and not _writable(path, strict=False) else ""
        url = f"sqlite:///file:{db}?mode=ro{immutable}&uri=true"
    engine = make_engine(url or f"sqlite:///{path / DB_FILE}")
    try:
        check_reachable(engine)
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
            with write_guard(f"upgrading the store database at {path}", "it is unchanged (the upgrade runs again "
                             "on the next open)", path):
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


#: Name prefix of the probe files of :func:`_writable`; ``gc`` removes stale ones.
PROBE_PREFIX = ".write-probe-"


def _writable(path: Path, strict: bool = True) -> bool:
    """Whether files can be created in ``path`` (honest for root too, unlike ``os.access``).

    False for a read-only place (permissions, read-only filesystem). Any other failure (a
    full disk, an I/O error) is raised when ``strict``, else counts as writable.
    """
    probe = path / f"{PROBE_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except OSError as exc:
        if is_read_only_error(exc):
            return False
        if strict:
            raise
        return True
    with suppress(OSError):  # left behind, it is removed by gc
        probe.unlink(missing_ok=True)
    return True


def stale_probes(path: Path) -> list[Path]:
    """Probe files of :func:`_writable` left in ``path`` (their removal failed)."""
    return sorted(path.glob(f"{PROBE_PREFIX}*"))
