"""share sealing: authenticated, fresh nonce per link

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29 14:20:00

Version-1 sealed tokens (token XOR HMAC(key, public id): one pad reused by every link of a
share) stay as they are, marked seal_version 1: re-sealing needs the app's secret key, which a
migration run does not reliably have (tests and deployments pass it in other ways). The app
reads version 1 and re-seals a row as version 2 the next time it touches it (webapp/shares.py).
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('share', schema=None) as batch_op:
        batch_op.add_column(sa.Column('seal_version', sa.Integer(), server_default='1', nullable=False))
        batch_op.alter_column('token_sealed', existing_type=sa.String(length=64),
                              type_=sa.String(length=160), existing_nullable=False)


def downgrade() -> None:
    # A version-2 row does not fit version 1's 64 characters, and turning it back needs the
    # secret key: those shares' links keep working (token_hash is kept) but the owner's list
    # could no longer show them, so refuse rather than keep rows the old code misreads.
    bind = op.get_bind()
    newer = bind.execute(sa.text("SELECT count(*) FROM share WHERE seal_version != 1")).scalar()
    if newer:
        raise RuntimeError(
            f"{newer} share link(s) are sealed with version 2, which revision 0002 cannot read: "
            "revoke them (or delete those rows) before downgrading"
        )
    with op.batch_alter_table('share', schema=None) as batch_op:
        batch_op.alter_column('token_sealed', existing_type=sa.String(length=160),
                              type_=sa.String(length=64), existing_nullable=False)
        batch_op.drop_column('seal_version')
