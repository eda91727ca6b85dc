"""indexes for paged lists and constant-cost appends

``ix_conversation_owner_updated_public_id`` (owner, updated_at, public_id) serves the
conversation list's keyset pages (newest first, the public id breaking ties: webapp/paging.py)
straight from the index on both databases; it replaces (owner, updated_at).
``ix_message_conversation_status`` answers "is a reply still streaming in this conversation?"
(asked before every server reply) without reading the conversation's messages.

Plain CREATE/DROP INDEX, not batch_alter_table: a batch on ``message`` would copy the table
under SQLite and drop migration 0010's search triggers.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07 13:00:00.000000
"""
from __future__ import annotations

from alembic import op

revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index('ix_conversation_owner_updated_public_id', 'conversation',
                    ['owner_id', 'updated_at', 'public_id'], unique=False)
    op.drop_index('ix_conversation_owner_updated', table_name='conversation')
    op.create_index('ix_message_conversation_status', 'message',
                    ['conversation_id', 'status'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_message_conversation_status', table_name='message')
    op.create_index('ix_conversation_owner_updated', 'conversation',
                    ['owner_id', 'updated_at'], unique=False)
    op.drop_index('ix_conversation_owner_updated_public_id', table_name='conversation')
