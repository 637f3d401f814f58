"""Migration 0003 carries existing rows across: metric columns into one document, archive dataset
specs from an absolute folder to one relative to the artifact store; and back on downgrade."""

from __future__ import annotations

import json

import sqlalchemy as sa
from alembic import command

from service.store.migrate import alembic_config, check_no_drift, downgrade_to, upgrade_head

MEASURED = {"loss": 0.5, "lr": 0.1, "top1": 0.9, "many": 1.0, "medium": 0.8, "few": 0.7, "ece": 0.05,
            "ece_many": 0.01, "ece_medium": 0.02, "ece_few": 0.03, "train_seconds": 1.5, "images_per_second": 100.0}


def _rows(engine: sa.Engine, query: str) -> list[tuple]:
    with engine.connect() as connection:
        return [tuple(json.loads(v) if isinstance(v, str) and v.startswith("{") else v for v in row)
                for row in connection.execute(sa.text(query))]


def test_rows_written_before_0003_survive_the_upgrade_and_the_downgrade(tmp_path, monkeypatch):
    monkeypatch.setenv("H2T_ARTIFACT_DIR", "/srv/h2t/artifacts")  # where the downgrade puts folders back
    url = f"sqlite:///{tmp_path / 'h2t.db'}"
    command.upgrade(alembic_config(url), "0002")
    engine = sa.create_engine(url)
    with engine.begin() as connection:
        connection.execute(sa.text(
            "INSERT INTO datasets"
            " (id, name, kind, spec, class_names, train_counts, test_counts, image_size, created_at)"
            " VALUES ('d1', 'a', 'archive', :archive, '[]', '[]', '[]', 48, '2026-01-01'),"
            " ('d2', 'b', 'builtin', :builtin, '[]', '[]', '[]', 16, '2026-01-01')"),
            {"archive": json.dumps({"folder": "/old/host/artifacts/datasets/d1", "image_size": 48}),
             "builtin": json.dumps({"builtin": "digits"})})
        connection.execute(sa.text(
            "INSERT INTO runs (id, dataset_id, config, status, epoch, attempts, created_at)"
            " VALUES ('r1', 'd1', :config, 'succeeded', 0, 1, '2026-01-01')"),
            {"config": json.dumps({"stage1": {"epochs": 3}, "stage2": {"epochs": 2}})})
        connection.execute(sa.text(
            f"INSERT INTO metrics (run_id, stage, epoch, {', '.join(MEASURED)}, created_at)"
            f" VALUES ('r1', 2, 1, {', '.join(f':{k}' for k in MEASURED)}, '2026-01-01')"), MEASURED)

    upgrade_head(url)
    check_no_drift(url)
    assert _rows(engine, "SELECT id, spec FROM datasets ORDER BY id") == [
        ("d1", {"archive": "datasets/d1", "image_size": 48}), ("d2", {"builtin": "digits"})]
    assert _rows(engine, 'SELECT "values" FROM metrics') == [({"stage": 2, "epoch": 1, "epochs": 2, **MEASURED},)]

    downgrade_to(url, "0002")
    assert _rows(engine, "SELECT id, kind, spec FROM datasets ORDER BY id") == [
        ("d1", "archive", {"folder": "/srv/h2t/artifacts/datasets/d1", "image_size": 48}),
        ("d2", "builtin", {"builtin": "digits"})]
    assert _rows(engine, f"SELECT {', '.join(MEASURED)} FROM metrics") == [tuple(MEASURED.values())]
