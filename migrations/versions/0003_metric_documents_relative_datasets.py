"""metric rows as one JSON document; dataset specs tagged by their key, archive folders relative

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27 10:00:00

- metrics: the per-epoch columns become one `values` document (the trainer's EpochMetrics record),
  so a new measured field needs no schema change.
- datasets: the `kind` column repeated what the spec's key says, and is dropped; an uploaded
  archive's spec `{"folder": "<absolute path on the API host>"}` becomes
  `{"archive": "datasets/<id>"}`, relative to the artifact store, as model files already are.
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0003'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# the record's fields when the columns were replaced (a later field never had a column)
METRIC_COLUMNS = ('loss', 'lr', 'top1', 'many', 'medium', 'few', 'ece', 'ece_many', 'ece_medium', 'ece_few',
                  'train_seconds', 'images_per_second')

metrics = sa.table('metrics', sa.column('id', sa.Integer), sa.column('run_id', sa.String), sa.column('stage', sa.Integer),
                   sa.column('epoch', sa.Integer), sa.column('values', sa.JSON),
                   *[sa.column(name, sa.Float) for name in METRIC_COLUMNS])
runs = sa.table('runs', sa.column('id', sa.String), sa.column('config', sa.JSON))
datasets = sa.table('datasets', sa.column('id', sa.String), sa.column('kind', sa.String),
                    sa.column('spec', sa.JSON))


def upgrade() -> None:
    connection = op.get_bind()
    with op.batch_alter_table('metrics', schema=None) as batch_op:
        batch_op.add_column(sa.Column('values', sa.JSON(), nullable=True))
    stage_epochs = {run_id: {1: config['stage1']['epochs'], 2: config['stage2']['epochs']}
                    for run_id, config in connection.execute(sa.select(runs.c.id, runs.c.config))}
    for row in connection.execute(sa.select(metrics)).mappings().all():
        values = {'stage': row['stage'], 'epoch': row['epoch'], 'epochs': stage_epochs[row['run_id']][row['stage']],
                  **{name: row[name] for name in METRIC_COLUMNS}}
        connection.execute(metrics.update().where(metrics.c.id == row['id']).values(values=values))
    with op.batch_alter_table('metrics', schema=None) as batch_op:
        batch_op.alter_column('values', existing_type=sa.JSON(), nullable=False)
        for name in METRIC_COLUMNS:
            batch_op.drop_column(name)

    for dataset_id, kind, spec in connection.execute(sa.select(datasets.c.id, datasets.c.kind, datasets.c.spec)).all():
        if kind == 'archive':
            connection.execute(datasets.update().where(datasets.c.id == dataset_id).values(
                spec={'archive': f'datasets/{dataset_id}', 'image_size': spec['image_size']}))
    with op.batch_alter_table('datasets', schema=None) as batch_op:
        batch_op.drop_column('kind')


def downgrade() -> None:
    from service.store.settings import Settings

    connection = op.get_bind()
    with op.batch_alter_table('datasets', schema=None) as batch_op:
        batch_op.add_column(sa.Column('kind', sa.String(length=16), nullable=True))
    artifact_dir = Settings().artifact_dir.resolve()
    for dataset_id, spec in connection.execute(sa.select(datasets.c.id, datasets.c.spec)).all():
        if 'archive' in spec:
            kind, spec = 'archive', {'folder': str(artifact_dir / spec['archive']), 'image_size': spec['image_size']}
        else:
            kind = 'builtin'
        connection.execute(datasets.update().where(datasets.c.id == dataset_id).values(kind=kind, spec=spec))
    with op.batch_alter_table('datasets', schema=None) as batch_op:
        batch_op.alter_column('kind', existing_type=sa.String(length=16), nullable=False)

    with op.batch_alter_table('metrics', schema=None) as batch_op:
        for name in METRIC_COLUMNS:
            batch_op.add_column(sa.Column(name, sa.Float(), nullable=True))
    for metric_id, values in connection.execute(sa.select(metrics.c.id, metrics.c['values'])).all():
        connection.execute(metrics.update().where(metrics.c.id == metric_id).values(
            {name: values[name] for name in METRIC_COLUMNS}))
    with op.batch_alter_table('metrics', schema=None) as batch_op:
        for name in METRIC_COLUMNS:
            batch_op.alter_column(name, existing_type=sa.Float(), nullable=False)
        batch_op.drop_column('values')
