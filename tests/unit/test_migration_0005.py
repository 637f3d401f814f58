"""Migration 0005 adds the dataset scan state: datasets registered before it (builtin, archive) are ready;
the downgrade drops the columns and keeps the rows."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import command

from service.store.migrate import alembic_config, check_no_drift, downgrade_to, upgrade_head

COLUMNS = {"status", "error", "unreadable", "enqueued_at"}


def _columns(engine: sa.Engine) -> set[str]:
    return {column["name"] for column in sa.inspect(engine).get_columns("datasets")}


def test_datasets_before_0005_are_ready_and_the_downgrade_drops_the_scan_columns(tmp_path):
    url = f"sqlite:///{tmp_path / 'h2t.db'}"
    command.upgrade(alembic_config(url), "0004")
    engine = sa.create_engine(url)
    with engine.begin() as connection:
        connection.execute(sa.text(
            "INSERT INTO datasets (id, name, spec, class_names, train_counts, test_counts, image_size, created_at) "
            """VALUES ('d1', 'digits', '{"builtin": "digits"}', '["0", "1"]', '[5, 1]', '[2, 2]', 16, """
            "'2026-11-27 10:00:00')"))
    assert not COLUMNS & _columns(engine)

    upgrade_head(url)
    check_no_drift(url)
    with engine.connect() as connection:
        row = connection.execute(sa.text("SELECT status, error, unreadable, enqueued_at FROM datasets")).one()
    assert tuple(row) == ("ready", None, None, None)

    downgrade_to(url, "0004")
    assert not COLUMNS & _columns(engine)
    with engine.connect() as connection:
        assert connection.execute(sa.text("SELECT id, name FROM datasets")).all() == [("d1", "digits")]
    engine.dispose()
