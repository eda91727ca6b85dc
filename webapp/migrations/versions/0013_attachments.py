"""attachments: files sent with a user message, their text in passages, and (SQLite) an FTS5
index of the passages for retrieval

``attachment`` rows are deleted with their message or conversation (ON DELETE CASCADE), and
their passages with them. On SQLite ``passage_search`` is an external-content FTS5 index of
``attachment_passage.text`` kept in step by triggers, as migration 0010 does for messages
(passages are never edited, so no update trigger). PostgreSQL ranks with ts_rank
over to_tsvector, its matches found by a GIN index of the same expression.

Revision ID: 0013_attachments
Revises: 0012_accounts
Create Date: 2026-12-07 16:00:00.000000
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0013_attachments'
down_revision = '0012_accounts'
branch_labels = None
depends_on = None

TRIGGERS = {
    "passage_search_insert": (
        "AFTER INSERT ON attachment_passage BEGIN "
        "INSERT INTO passage_search(rowid, text) VALUES (new.id, new.text); END"
    ),
    "passage_search_delete": (
        "AFTER DELETE ON attachment_passage BEGIN "
        "INSERT INTO passage_search(passage_search, rowid, text) VALUES ('delete', old.id, old.text); END"
    ),
}


def upgrade() -> None:
    op.create_table(
        'attachment',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('public_id', sa.String(length=32), nullable=False),
        sa.Column('owner_id', sa.String(length=64), nullable=False),
        sa.Column('conversation_id', sa.Integer(), nullable=True),
        sa.Column('message_id', sa.Integer(), nullable=True),
        sa.Column('filename', sa.String(length=255), nullable=False),
        sa.Column('mime', sa.String(length=100), nullable=False),
        sa.Column('size', sa.Integer(), nullable=False),
        sa.Column('sha256', sa.String(length=64), nullable=False),
        sa.Column('text', sa.Text(), nullable=False),
        sa.Column('chars', sa.Integer(), nullable=False),
        sa.Column('tokens', sa.Integer(), nullable=False),
        sa.Column('pages', sa.Integer(), nullable=True),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(['conversation_id'], ['conversation.id'], ondelete='CASCADE',
                                name=op.f('fk_attachment_conversation_id_conversation')),
        sa.ForeignKeyConstraint(['message_id'], ['message.id'], ondelete='CASCADE',
                                name=op.f('fk_attachment_message_id_message')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_attachment')),
        sa.UniqueConstraint('public_id', name=op.f('uq_attachment_public_id')),
    )
    op.create_index(op.f('ix_attachment_owner_id'), 'attachment', ['owner_id'], unique=False)
    op.create_index(op.f('ix_attachment_conversation_id'), 'attachment', ['conversation_id'],
                    unique=False)
    op.create_index(op.f('ix_attachment_message_id'), 'attachment', ['message_id'], unique=False)
    op.create_table(
        'attachment_passage',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('attachment_id', sa.Integer(), nullable=False),
        sa.Column('ordinal', sa.Integer(), nullable=False),
        sa.Column('page', sa.Integer(), nullable=True),
        sa.Column('line_start', sa.Integer(), nullable=False),
        sa.Column('line_end', sa.Integer(), nullable=False),
        sa.Column('text', sa.Text(), nullable=False),
        sa.Column('tokens', sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(['attachment_id'], ['attachment.id'], ondelete='CASCADE',
                                name=op.f('fk_attachment_passage_attachment_id_attachment')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_attachment_passage')),
    )
    op.create_index(op.f('ix_attachment_passage_attachment_id'), 'attachment_passage',
                    ['attachment_id'], unique=False)
    if op.get_bind().dialect.name == "postgresql":
        # the words of each passage, indexed: retrieval's @@ finds its matches without reading
        # every passage of a large file (an expression index: no model describes it)
        op.execute("CREATE INDEX ix_attachment_passage_words ON attachment_passage "
                   "USING gin (to_tsvector('english', text))")
    if op.get_bind().dialect.name == "sqlite":
        op.execute(
            "CREATE VIRTUAL TABLE passage_search USING fts5(text, content='attachment_passage', "
            "content_rowid='id', tokenize='unicode61 remove_diacritics 2')")
        for name, body in TRIGGERS.items():
            op.execute(f"CREATE TRIGGER {name} {body}")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP INDEX IF EXISTS ix_attachment_passage_words")
    if op.get_bind().dialect.name == "sqlite":
        for name in TRIGGERS:
            op.execute(f"DROP TRIGGER IF EXISTS {name}")
        op.execute("DROP TABLE IF EXISTS passage_search")
    op.drop_index(op.f('ix_attachment_passage_attachment_id'), table_name='attachment_passage')
    op.drop_table('attachment_passage')
    op.drop_index(op.f('ix_attachment_message_id'), table_name='attachment')
    op.drop_index(op.f('ix_attachment_conversation_id'), table_name='attachment')
    op.drop_index(op.f('ix_attachment_owner_id'), table_name='attachment')
    op.drop_table('attachment')
