"""Alembic environment: the URL comes from bchat's own settings unless the caller set one."""

from __future__ import annotations

from alembic import context

from webapp.config import load_config
from webapp.db import make_engine
from webapp.models import Base

config = context.config
target_metadata = Base.metadata


def database_url() -> str:
    url = config.attributes.get("database_url") or config.get_main_option("sqlalchemy.url")
    if url:
        return url
    from webapp.config import instance_path

    return load_config(instance_path())["DATABASE_URL"]


def run_migrations_offline() -> None:
    context.configure(
        url=database_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = make_engine(database_url())
    with engine.connect() as connection:
        if connection.dialect.name == "sqlite":
            # Batch mode rebuilds a table by copying it and dropping the original; with
            # foreign keys on, that DROP deletes every row that references the table (ON DELETE
            # CASCADE), e.g. all messages when the conversation table is rebuilt. The pragma
            # only takes effect outside a transaction, hence on the raw connection (in
            # autocommit mode: webapp.db issues BEGIN itself) before SQLAlchemy begins one.
            connection.connection.dbapi_connection.execute("PRAGMA foreign_keys=OFF")
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            # SQLite cannot ALTER most things: batch mode rebuilds the table instead.
            render_as_batch=True,
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
