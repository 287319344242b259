"""Bring a database to the schema of this release with Alembic (run by the daemon at start).

A database made by Ember 0.1 has its tables but no ``alembic_version``: it is stamped as revision 0001 (the
schema 0.1 made) first, so upgrading keeps every image, build and VM.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect
from sqlalchemy.engine import Connection, Engine

MIGRATIONS = Path(__file__).with_name("migrations")
LEGACY_REVISION = "0001"


def _config(connection: Connection) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def head() -> str:
    script = ScriptDirectory.from_config(_config(None))  # type: ignore[arg-type]
    return str(script.get_current_head())


def current(engine: Engine) -> str | None:
    with engine.connect() as c:
        return MigrationContext.configure(c).get_current_revision()


def upgrade(engine: Engine) -> None:
    """Migrate to the newest revision; idempotent."""
    with engine.begin() as connection:
        config = _config(connection)
        tables = set(inspect(connection).get_table_names())
        if "alembic_version" not in tables and {"images", "builds", "vms"} <= tables:
            command.stamp(config, LEGACY_REVISION)
        command.upgrade(config, "head")
