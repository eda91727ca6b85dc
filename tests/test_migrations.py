"""The schema comes only from Alembic, and the models match it."""

from __future__ import annotations

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from webapp.db import alembic_config, make_engine
from webapp.models import Base


def _modelled(name, type_, _parent) -> bool:
    """The search indexes (SQLite FTS5, migrations 0010 and 0012: virtual tables and their
    shadow tables; PostgreSQL's expression index of the passages' words, 0012) live only in
    the migrations, like their triggers: no model describes them."""
    if type_ == "index" and name == "ix_attachment_passage_words":
        return False
    return not (type_ == "table" and name and name.startswith(("message_search", "passage_search")))


@pytest.mark.databases("sqlite", "postgresql")
def test_empty_to_head_and_back(new_database):
    url = new_database(migrated=False)
    cfg = alembic_config(url)
    command.upgrade(cfg, "head")
    engine = make_engine(url)
    try:
        tables = set(inspect(engine).get_table_names())
        assert {"conversation", "message", "alembic_version"} <= tables
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True,
                                                               "include_name": _modelled}),
                                    Base.metadata)
        assert diff == [], f"models and migrations disagree: {diff}"
    finally:
        engine.dispose()
    command.downgrade(cfg, "base")
    engine = make_engine(url)
    try:
        assert set(inspect(engine).get_table_names()) == {"alembic_version"}
    finally:
        engine.dispose()


def test_sqlite_pragmas(app):
    db = app.extensions["bchat"].db
    with db.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 5000
