"""datasets.unreadable_count: how many files a scan left out; `unreadable` lists the first of them

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-27 23:30:00

A scan of 10^6 files can leave out many of them; the row keeps every count but lists at most
`UNREADABLE_LISTED` of the files. Rows scanned before this revision listed all of theirs: their count
is the length of that list.
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0006'
down_revision: str | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('datasets', schema=None) as batch_op:
        batch_op.add_column(sa.Column('unreadable_count', sa.Integer(), nullable=False, server_default='0'))
    datasets = sa.table('datasets', sa.column('id', sa.String), sa.column('unreadable', sa.JSON),
                        sa.column('unreadable_count', sa.Integer))
    connection = op.get_bind()
    for dataset_id, unreadable in connection.execute(sa.select(datasets.c.id, datasets.c.unreadable)).all():
        if unreadable:
            connection.execute(sa.update(datasets).where(datasets.c.id == dataset_id)
                               .values(unreadable_count=len(unreadable)))


def downgrade() -> None:
    with op.batch_alter_table('datasets', schema=None) as batch_op:
        batch_op.drop_column('unreadable_count')
