"""conversation trees: message.parent_id, conversation.current_message_id and settings,
visitor defaults

Existing conversations become single branches: each message's parent is the one before it,
and the current leaf is the newest message.

Revision ID: 0008
Revises: 0006
Create Date: 2026-11-29 14:40:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0008'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('conversation', schema=None) as batch_op:
        batch_op.add_column(sa.Column('current_message_id', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('settings', sa.JSON(), nullable=True))
    with op.batch_alter_table('message', schema=None) as batch_op:
        batch_op.add_column(sa.Column('parent_id', sa.Integer(), nullable=True))
        batch_op.create_index('ix_message_parent_id', ['parent_id'], unique=False)
        batch_op.create_foreign_key('fk_message_parent_id_message', 'message', ['parent_id'], ['id'],
                                    ondelete='CASCADE')
    op.create_table('visitor_settings',
        sa.Column('owner_id', sa.String(length=64), nullable=False),
        sa.Column('settings', sa.JSON(), nullable=False),
        sa.Column('updated_at', sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint('owner_id', name=op.f('pk_visitor_settings')),
    )
    # Backfill: a linear history is a tree with one branch.
    op.execute(
        "UPDATE message SET parent_id = (SELECT MAX(m2.id) FROM message m2 "
        "WHERE m2.conversation_id = message.conversation_id AND m2.id < message.id)"
    )
    op.execute(
        "UPDATE conversation SET current_message_id = (SELECT MAX(m.id) FROM message m "
        "WHERE m.conversation_id = conversation.id)"
    )


def downgrade() -> None:
    op.drop_table('visitor_settings')
    with op.batch_alter_table('message', schema=None) as batch_op:
        batch_op.drop_constraint('fk_message_parent_id_message', type_='foreignkey')
        batch_op.drop_index('ix_message_parent_id')
        batch_op.drop_column('parent_id')
    with op.batch_alter_table('conversation', schema=None) as batch_op:
        batch_op.drop_column('settings')
        batch_op.drop_column('current_message_id')
