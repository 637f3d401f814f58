"""datasets.status, error, unreadable, enqueued_at: datasets by reference are scanned by a worker

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27 21:00:00

A dataset named by reference under the data root is registered `scanning` and goes `ready` or `failed`
when a worker has read its index; builtin and archive datasets, the only ones before this revision,
are `ready`.
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0005'
down_revision: str | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('datasets', schema=None) as batch_op:
        batch_op.add_column(sa.Column('status', sa.Enum('scanning', 'ready', 'failed', name='dataset_status',
                                                        native_enum=False, length=16),
                                      nullable=False, server_default='ready'))
        batch_op.add_column(sa.Column('error', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('unreadable', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('enqueued_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('datasets', schema=None) as batch_op:
        batch_op.drop_column('enqueued_at')
        batch_op.drop_column('unreadable')
        batch_op.drop_column('error')
        batch_op.drop_column('status')
