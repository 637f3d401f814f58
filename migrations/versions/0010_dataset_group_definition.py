"""datasets.group_definition: one many/medium/few definition per dataset, used by every run and report on it

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-28 04:30:00

Existing datasets get the count thresholds (many > 100, few < 20), the groups the API reported for them.
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0010'
down_revision: str | None = '0009'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

THRESHOLDS = '{"many_threshold": 100, "few_threshold": 20, "slices": null}'


def upgrade() -> None:
    with op.batch_alter_table('datasets', schema=None) as batch_op:
        batch_op.add_column(sa.Column('group_definition', sa.JSON(), nullable=False,
                                      server_default=sa.text(f"'{THRESHOLDS}'")))


def downgrade() -> None:
    with op.batch_alter_table('datasets', schema=None) as batch_op:
        batch_op.drop_column('group_definition')
