"""The schema only changes through Alembic: upgrade and downgrade work on PostgreSQL and SQLite,
and the ORM matches the migrations (no drift)."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from service.store.migrate import check_no_drift, downgrade_base, upgrade_head
from service.store.orm import Base

pytestmark = pytest.mark.integration
TABLES = {"datasets", "runs", "metrics", "artifacts", "models", "workers", "run_tags", "registered_models",
          "model_versions", "model_aliases", "alias_events"}


def _tables(url: str) -> set[str]:
    engine = sa.create_engine(url)
    try:
        return set(sa.inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


@pytest.fixture(params=["postgresql", "sqlite"])
def empty_database(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'migrations.db'}"
    return request.getfixturevalue("make_database")()


def test_migrations_upgrade_an_empty_database_to_head_and_downgrade_back(empty_database):
    assert _tables(empty_database) == set()
    upgrade_head(empty_database)
    assert _tables(empty_database) == set(Base.metadata.tables) == TABLES
    check_no_drift(empty_database)
    downgrade_base(empty_database)
    assert _tables(empty_database) == set()
    upgrade_head(empty_database)  # and up again
    assert _tables(empty_database) == TABLES
