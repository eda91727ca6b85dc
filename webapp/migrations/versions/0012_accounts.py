"""accounts: users (password or OpenID Connect), their sessions, one-time device links, site settings, an audit log, the usage of deleted conversations

Revision ID: 0012_accounts
Revises: 0011
Create Date: 2026-12-07 16:00:00.000000
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0012_accounts'
down_revision = '0011'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'account',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('public_id', sa.String(length=32), nullable=False),
        sa.Column('username', sa.String(length=64), nullable=False),
        sa.Column('password_hash', sa.String(length=200), nullable=True),
        sa.Column('oidc_subject', sa.String(length=400), nullable=True),
        sa.Column('role', sa.String(length=16), server_default='user', nullable=False),
        sa.Column('disabled', sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column('owner_id', sa.String(length=64), nullable=False),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.Column('last_sign_in_at', sa.DateTime(), nullable=True),
        sa.Column('tokens_per_day', sa.Integer(), nullable=True),
        sa.Column('replies_in_flight', sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_account')),
        sa.UniqueConstraint('oidc_subject', name=op.f('uq_account_oidc_subject')),
        sa.UniqueConstraint('owner_id', name=op.f('uq_account_owner_id')),
        sa.UniqueConstraint('public_id', name=op.f('uq_account_public_id')),
        sa.UniqueConstraint('username', name=op.f('uq_account_username')),
    )
    op.create_table(
        'account_session',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('public_id', sa.String(length=32), nullable=False),
        sa.Column('token_hash', sa.String(length=64), nullable=False),
        sa.Column('account_id', sa.Integer(), nullable=False),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.Column('last_seen_at', sa.DateTime(), nullable=False),
        sa.Column('user_agent', sa.String(length=200), nullable=True),
        sa.Column('address', sa.String(length=64), nullable=True),
        sa.Column('how', sa.String(length=16), server_default='password', nullable=False),
        sa.Column('revoked_at', sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(['account_id'], ['account.id'],
                                name=op.f('fk_account_session_account_id_account'),
                                ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_account_session')),
        sa.UniqueConstraint('public_id', name=op.f('uq_account_session_public_id')),
        sa.UniqueConstraint('token_hash', name=op.f('uq_account_session_token_hash')),
    )
    op.create_index(op.f('ix_account_session_account_id'), 'account_session', ['account_id'])
    op.create_table(
        'device_link',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('token_hash', sa.String(length=64), nullable=False),
        sa.Column('account_id', sa.Integer(), nullable=True),
        sa.Column('owner_id', sa.String(length=64), nullable=True),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.Column('expires_at', sa.DateTime(), nullable=False),
        sa.Column('used_at', sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(['account_id'], ['account.id'],
                                name=op.f('fk_device_link_account_id_account'), ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_device_link')),
        sa.UniqueConstraint('token_hash', name=op.f('uq_device_link_token_hash')),
    )
    op.create_index(op.f('ix_device_link_account_id'), 'device_link', ['account_id'])
    op.create_table(
        'site_setting',
        sa.Column('name', sa.String(length=64), nullable=False),
        sa.Column('value', sa.JSON(), nullable=False),
        sa.Column('updated_at', sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint('name', name=op.f('pk_site_setting')),
    )
    op.create_table(
        'audit_event',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('at', sa.DateTime(), nullable=False),
        sa.Column('actor', sa.String(length=64), nullable=True),
        sa.Column('action', sa.String(length=40), nullable=False),
        sa.Column('target', sa.String(length=64), nullable=True),
        sa.Column('address', sa.String(length=64), nullable=True),
        sa.Column('detail', sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_audit_event')),
    )
    op.create_index(op.f('ix_audit_event_at'), 'audit_event', ['at'])
    op.create_table(
        'usage_carry',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('owner_id', sa.String(length=64), nullable=False),
        sa.Column('day', sa.String(length=10), nullable=False),
        sa.Column('engine', sa.String(length=16), nullable=True),
        sa.Column('model', sa.String(length=200), nullable=True),
        sa.Column('replies', sa.Integer(), nullable=False),
        sa.Column('prompt_tokens', sa.Integer(), nullable=False),
        sa.Column('completion_tokens', sa.Integer(), nullable=False),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_usage_carry')),
    )
    op.create_index(op.f('ix_usage_carry_owner_id'), 'usage_carry', ['owner_id'])


def downgrade() -> None:
    op.drop_index(op.f('ix_usage_carry_owner_id'), table_name='usage_carry')
    op.drop_table('usage_carry')
    op.drop_index(op.f('ix_audit_event_at'), table_name='audit_event')
    op.drop_table('audit_event')
    op.drop_table('site_setting')
    op.drop_index(op.f('ix_device_link_account_id'), table_name='device_link')
    op.drop_table('device_link')
    op.drop_index(op.f('ix_account_session_account_id'), table_name='account_session')
    op.drop_table('account_session')
    op.drop_table('account')
