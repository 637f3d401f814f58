"""Migration 0006 counts the files a scan left out; a dataset row lists only the first of them."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import command
from sqlalchemy.orm import Session

from service.store import datasets
from service.store.migrate import alembic_config, check_no_drift, downgrade_to, upgrade_head
from service.store.orm import DatasetRow, DatasetStatus


def _insert(connection: sa.Connection, dataset_id: str, unreadable: str) -> None:
    connection.execute(sa.text(
        "INSERT INTO datasets (id, name, spec, class_names, train_counts, test_counts, image_size, created_at, "
        f"status, unreadable) VALUES ('{dataset_id}', 'pets', '{{\"folder\": \"pets\"}}', '[\"a\", \"b\"]', "
        f"'[5, 1]', '[2, 2]', 224, '2026-11-27 10:00:00', 'ready', {unreadable})"))


def test_rows_scanned_before_0006_count_the_files_they_list_and_the_downgrade_keeps_the_list(tmp_path):
    url = f"sqlite:///{tmp_path / 'h2t.db'}"
    command.upgrade(alembic_config(url), "0005")
    engine = sa.create_engine(url)
    with engine.begin() as connection:
        listed = """'[{"path": "pets/x.jpg", "reason": "r"}, {"path": "pets/y", "reason": "r"}]'"""
        _insert(connection, "listed", listed)
        _insert(connection, "clean", "NULL")
    upgrade_head(url)
    check_no_drift(url)
    with engine.connect() as connection:
        counts = dict(connection.execute(sa.text("SELECT id, unreadable_count FROM datasets")).all())
    assert counts == {"listed": 2, "clean": 0}
    downgrade_to(url, "0005")
    with engine.connect() as connection:
        assert len(connection.execute(sa.text("SELECT unreadable FROM datasets WHERE id = 'listed'")).scalar_one()) > 2
    engine.dispose()


def test_a_scan_that_left_out_many_files_lists_the_first_thousand_and_counts_them_all(tmp_path):
    url = f"sqlite:///{tmp_path / 'h2t.db'}"
    upgrade_head(url)
    engine = sa.create_engine(url)
    left_out = [{"path": f"pets/{i}.jpg", "reason": "not an image Pillow can open"} for i in range(2500)]
    with Session(engine) as session:
        session.add(DatasetRow(id="d", name="pets", spec={"folder": "pets"}, class_names=[], train_counts=[],
                               test_counts=[], image_size=224, status=DatasetStatus.scanning))
        session.flush()
        assert datasets.scanned(session, "d", ["a", "b"], [3, 1], [1, 1], left_out)
        session.commit()
        row = session.get(DatasetRow, "d")
        assert row.unreadable_count == 2500 and row.unreadable == left_out[:datasets.UNREADABLE_LISTED]
    engine.dispose()
