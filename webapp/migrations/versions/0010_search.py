"""full-text search over message text (SQLite: an FTS5 index kept in step by triggers)

The index is external-content (content='message'): it stores the words, not a second copy of
every message. Triggers keep it in step with inserts, deletes and edits of message.content.
PostgreSQL gets nothing here: webapp/search.py asks it with ILIKE instead.

Caution for later migrations: a batch_alter_table on ``message`` under SQLite copies the table
and drops these triggers; such a migration must recreate them (see _create_triggers) and
rebuild the index.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-29 15:00:00.000000
"""
from __future__ import annotations

from alembic import op

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None

TRIGGERS = {
    "message_search_insert": (
        "AFTER INSERT ON message BEGIN "
        "INSERT INTO message_search(rowid, content) VALUES (new.id, new.content); END"
    ),
    "message_search_delete": (
        "AFTER DELETE ON message BEGIN "
        "INSERT INTO message_search(message_search, rowid, content) VALUES ('delete', old.id, old.content); END"
    ),
    "message_search_update": (
        "AFTER UPDATE OF content ON message BEGIN "
        "INSERT INTO message_search(message_search, rowid, content) VALUES ('delete', old.id, old.content); "
        "INSERT INTO message_search(rowid, content) VALUES (new.id, new.content); END"
    ),
}


def _sqlite() -> bool:
    return op.get_bind().dialect.name == "sqlite"


def _create_triggers() -> None:
    for name, body in TRIGGERS.items():
        op.execute(f"CREATE TRIGGER {name} {body}")


def upgrade() -> None:
    if not _sqlite():
        return
    # unicode61 with remove_diacritics: "cafe" finds "café"; prefix queries need no extra index.
    op.execute(
        "CREATE VIRTUAL TABLE message_search USING fts5("
        "content, content='message', content_rowid='id', tokenize='unicode61 remove_diacritics 2')"
    )
    op.execute("INSERT INTO message_search(message_search) VALUES ('rebuild')")  # existing messages
    _create_triggers()


def downgrade() -> None:
    if not _sqlite():
        return
    for name in TRIGGERS:
        op.execute(f"DROP TRIGGER IF EXISTS {name}")
    op.execute("DROP TABLE IF EXISTS message_search")
