"""model registry: registered names, numbered versions (each one model), aliases and their moves; models
get their own id (a run's model keeps the run's id) so a model imported from `h2t train` needs no run

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-28 04:58:30

A model that is a registered version cannot be deleted (model_versions.model_id RESTRICT); deleting a
registered name removes its versions, aliases and alias history, never the models.
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0011'
down_revision: str | None = '0010'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('models', schema=None) as batch_op:
        batch_op.add_column(sa.Column('id', sa.String(length=36), nullable=True))
        batch_op.add_column(sa.Column('origin', sa.JSON(), nullable=True))
    op.execute("UPDATE models SET id = run_id")
    with op.batch_alter_table('models', schema=None) as batch_op:
        batch_op.alter_column('id', existing_type=sa.String(length=36), nullable=False)
        batch_op.drop_constraint('pk_models', type_='primary')
        batch_op.create_primary_key('pk_models', ['id'])
        batch_op.alter_column('run_id', existing_type=sa.String(length=36), nullable=True)
        batch_op.create_unique_constraint(batch_op.f('uq_models_run_id'), ['run_id'])
    op.create_table('registered_models',
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('description', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('created_by', sa.String(length=200), nullable=False),
    sa.PrimaryKeyConstraint('name', name=op.f('pk_registered_models'))
    )
    op.create_table('alias_events',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('alias', sa.String(length=64), nullable=False),
    sa.Column('version', sa.Integer(), nullable=True),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('by', sa.String(length=200), nullable=False),
    sa.ForeignKeyConstraint(['name'], ['registered_models.name'], name=op.f('fk_alias_events_name_registered_models'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_alias_events'))
    )
    with op.batch_alter_table('alias_events', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_alias_events_name'), ['name'], unique=False)

    op.create_table('model_aliases',
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('alias', sa.String(length=64), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_by', sa.String(length=200), nullable=False),
    sa.ForeignKeyConstraint(['name'], ['registered_models.name'], name=op.f('fk_model_aliases_name_registered_models'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('name', 'alias', name=op.f('pk_model_aliases'))
    )
    op.create_table('model_versions',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('model_id', sa.String(length=36), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('created_by', sa.String(length=200), nullable=False),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], name=op.f('fk_model_versions_model_id_models'), ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['name'], ['registered_models.name'], name=op.f('fk_model_versions_name_registered_models'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_model_versions')),
    sa.UniqueConstraint('name', 'version', name='uq_model_versions_name_version')
    )
    with op.batch_alter_table('model_versions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_model_versions_model_id'), ['model_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_model_versions_name'), ['name'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('model_versions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_model_versions_name'))
        batch_op.drop_index(batch_op.f('ix_model_versions_model_id'))

    op.drop_table('model_versions')
    op.drop_table('model_aliases')
    with op.batch_alter_table('alias_events', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_alias_events_name'))

    op.drop_table('alias_events')
    op.drop_table('registered_models')
    op.execute("DELETE FROM models WHERE run_id IS NULL")  # imported models have no run to be keyed by
    with op.batch_alter_table('models', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('uq_models_run_id'), type_='unique')
        batch_op.alter_column('run_id', existing_type=sa.String(length=36), nullable=False)
        batch_op.drop_constraint('pk_models', type_='primary')
        batch_op.create_primary_key('pk_models', ['run_id'])
        batch_op.drop_column('origin')
        batch_op.drop_column('id')
