"""runs.name, runs.method and run_tags: runs a user can name, tag and filter

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-28 02:30:00

`method` repeats the run config's stage2.method as a column to filter on; existing rows get it from
their config.
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0009'
down_revision: str | None = '0008'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('name', sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column('method', sa.String(length=16), nullable=False, server_default='h2t'))
        batch_op.create_index(batch_op.f('ix_runs_name'), ['name'], unique=False)
        batch_op.create_index(batch_op.f('ix_runs_method'), ['method'], unique=False)
    runs = sa.table('runs', sa.column('id', sa.String), sa.column('config', sa.JSON), sa.column('method', sa.String))
    connection = op.get_bind()
    for run_id, config in connection.execute(sa.select(runs.c.id, runs.c.config)).all():
        method = ((config or {}).get('stage2') or {}).get('method', 'h2t')
        if method != 'h2t':
            connection.execute(sa.update(runs).where(runs.c.id == run_id).values(method=method))
    op.create_table(
        'run_tags',
        sa.Column('run_id', sa.String(length=36), nullable=False),
        sa.Column('tag', sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(['run_id'], ['runs.id'], name=op.f('fk_run_tags_run_id_runs'), ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('run_id', 'tag', name=op.f('pk_run_tags')),
    )
    with op.batch_alter_table('run_tags', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_run_tags_tag'), ['tag'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('run_tags', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_run_tags_tag'))
    op.drop_table('run_tags')
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_runs_method'))
        batch_op.drop_index(batch_op.f('ix_runs_name'))
        batch_op.drop_column('method')
        batch_op.drop_column('name')
