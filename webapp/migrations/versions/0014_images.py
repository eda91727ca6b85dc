"""images: an attachment may be an image, kept whole (its bytes, width and height)

Text and PDF attachments keep only their text; an image is sent to a vision model as it is,
so its bytes are stored with it (``data``), deleted with it (the row's ON DELETE CASCADE
from its conversation) and counted in its visitor's quota like any file (``size``).

Revision ID: 0014_images
Revises: 0013_attachments
Create Date: 2026-12-07 19:00:00.000000
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0014_images'
down_revision = '0013_attachments'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('attachment', sa.Column('data', sa.LargeBinary(), nullable=True))
    op.add_column('attachment', sa.Column('width', sa.Integer(), nullable=True))
    op.add_column('attachment', sa.Column('height', sa.Integer(), nullable=True))


def downgrade() -> None:
    # Images cannot be kept without their bytes: they go, as files revision 0013 cannot hold.
    op.execute("DELETE FROM attachment WHERE width IS NOT NULL")
    op.drop_column('attachment', 'height')
    op.drop_column('attachment', 'width')
    op.drop_column('attachment', 'data')
