"""Fixtures shared by every test package: the database ``backend`` (see ``backends.py``).

A test that asks for ``backend`` (directly or through another fixture) runs on SQLite and
on PostgreSQL, ids ``sqlite`` and ``postgresql`` (``pytest -k postgresql``), unless it is
marked ``sqlite_only``. A fixture or test that asks for it without being parametrised (an
explicit ``indirect`` parametrisation aside) gets SQLite.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from backends import Backend, ids_for, pg_schema, postgresql_url


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "sqlite_only: run on the SQLite backend only (the test reaches into the SQLite file itself)"
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" not in metafunc.fixturenames:
        return
    if any("backend" in m.args[0] for m in metafunc.definition.iter_markers("parametrize") if m.args):
        return  # the test parametrises it itself
    names = ids_for(metafunc.definition)
    metafunc.parametrize("backend", names, ids=names, indirect=True)


@pytest.fixture
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """This test's database: SQLite in ``tmp_path`` or a fresh PostgreSQL schema."""
    name = getattr(request, "param", "sqlite")
    if name == "sqlite":
        yield Backend("sqlite", None, tmp_path)
        return
    if name != "postgresql":
        raise ValueError(f"unknown backend {name!r}")
    with pg_schema(postgresql_url()) as url:
        yield Backend("postgresql", url, tmp_path)
