"""durable runs: replies grow in place while streaming

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29 14:30:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('message', schema=None) as batch_op:
        batch_op.add_column(sa.Column('updated_at', sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column('run_owner', sa.String(length=120), nullable=True))
        batch_op.add_column(sa.Column('stop_requested', sa.Boolean(), server_default=sa.false(), nullable=False))
        batch_op.create_index('ix_message_status', ['status'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('message', schema=None) as batch_op:
        batch_op.drop_index('ix_message_status')
        batch_op.drop_column('stop_requested')
        batch_op.drop_column('run_owner')
        batch_op.drop_column('updated_at')
