"""runs.enqueued_at: when a run was last sent to the broker

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27 18:00:00

The stale-run sweep sends a run again when it has stayed queued long after it was last sent (its
message may have been lost); runs queued before this column existed count from their creation.
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('enqueued_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.drop_column('enqueued_at')
