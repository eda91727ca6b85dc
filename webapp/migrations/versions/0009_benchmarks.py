"""benchmarks: stored runs of the fixed prompt set, server and browsers

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-29 14:50:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('benchmark',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('public_id', sa.String(length=32), nullable=False),
        sa.Column('owner_id', sa.String(length=64), nullable=True),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.Column('engine', sa.String(length=16), nullable=False),
        sa.Column('backend', sa.String(length=32), nullable=False),
        sa.Column('model', sa.String(length=200), nullable=False),
        sa.Column('model_facts', sa.JSON(), nullable=False),
        sa.Column('device', sa.JSON(), nullable=False),
        sa.Column('results', sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_benchmark')),
        sa.UniqueConstraint('public_id', name=op.f('uq_benchmark_public_id')),
    )
    with op.batch_alter_table('benchmark', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_benchmark_owner_id'), ['owner_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('benchmark', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_benchmark_owner_id'))
    op.drop_table('benchmark')
