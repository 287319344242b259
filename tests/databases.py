"""The databases tests run on: SQLite files, or fresh databases on the PostgreSQL server of the suite's
second pass (``scripts/postgres.sh`` sets ``EMBER_TEST_DATABASE_URL``; ``scripts/test.sh`` runs both passes).

Every daemon and every store test gets a database of its own: two daemons on one database would take each
other's VMs over. When the variable is set, an unreachable server fails the tests that need it (never a
skip): CI always sets it for the PostgreSQL pass.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, make_url, text

TEST_DATABASE_URL = "EMBER_TEST_DATABASE_URL"


def server_url() -> str:
    """The PostgreSQL server's URL (a database to connect to for administration), or "" (the SQLite pass)."""
    return os.environ.get(TEST_DATABASE_URL, "")


def admin(statement: str) -> None:
    engine = create_engine(server_url(), isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as c:
            c.execute(text(statement))
    finally:
        engine.dispose()


def create_database(label: str, *, options: str = "") -> str:
    """A new empty database on the test server (``label`` tells what it is for); returns its URL."""
    name = f"ember_{label}_{secrets.token_hex(4)}"
    admin(f'CREATE DATABASE "{name}" {options}')
    return make_url(server_url()).set(database=name).render_as_string(hide_password=False)


def drop_database(url: str) -> None:
    """Remove a database :func:`create_database` made, closing whatever still uses it."""
    name = make_url(url).database
    assert name is not None and name.startswith("ember_"), url
    admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def daemon_database_url(label: str) -> str:
    """EMBER_DATABASE_URL for a test daemon: a fresh PostgreSQL database in the second pass, "" (SQLite in its
    data directory) in the first."""
    return create_database(label) if server_url() else ""


@contextlib.contextmanager
def fresh_database(backend: str, tmp_path: Path) -> Iterator[str]:
    """A fresh database's URL: ``sqlite`` (a file in ``tmp_path``) or ``postgresql`` (on the test server; skipped
    in the SQLite pass, where EMBER_TEST_DATABASE_URL is unset)."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'ember.db'}"
        return
    if not server_url():
        pytest.skip(f"{TEST_DATABASE_URL} is not set: scripts/postgres.sh run .venv/bin/python -m pytest ...")
    url = create_database("unit")
    try:
        yield url
    finally:
        drop_database(url)
