"""widen message.backend and message.finish_reason to the 200 characters the API accepts

PostgreSQL enforces VARCHAR lengths (SQLite does not), so a browser reply whose backend was
33-200 characters passed validation and then failed the INSERT.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29 14:10:00.000000
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('message', schema=None) as batch_op:
        batch_op.alter_column('backend', existing_type=sa.String(length=32),
                              type_=sa.String(length=200), existing_nullable=True)
        batch_op.alter_column('finish_reason', existing_type=sa.String(length=32),
                              type_=sa.String(length=200), existing_nullable=True)


def downgrade() -> None:
    # Values longer than 32 characters would not fit back: cut them rather than fail.
    message = sa.table('message', sa.column('backend', sa.String), sa.column('finish_reason', sa.String))
    for column in ('backend', 'finish_reason'):
        op.execute(message.update()
                   .where(sa.func.length(message.c[column]) > 32)
                   .values({column: sa.func.substr(message.c[column], 1, 32)}))
    with op.batch_alter_table('message', schema=None) as batch_op:
        batch_op.alter_column('finish_reason', existing_type=sa.String(length=200),
                              type_=sa.String(length=32), existing_nullable=True)
        batch_op.alter_column('backend', existing_type=sa.String(length=200),
                              type_=sa.String(length=32), existing_nullable=True)
