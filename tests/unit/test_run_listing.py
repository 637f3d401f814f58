"""Listing runs reads the latest metric row and the model of every run in a fixed number of queries."""

from __future__ import annotations

import pytest
from sqlalchemy import event

from models.contract.config import RunConfig
from models.contract.metrics import EpochMetrics
from service.api.runs import service
from service.store.db import get_engine, session_scope
from service.store.migrate import upgrade_head
from service.store.orm import DatasetRow, MetricRow, ModelRow, RunRow


def _epoch(stage: int, epoch: int, top1: float) -> EpochMetrics:
    return EpochMetrics(stage=stage, epoch=epoch, epochs=3, loss=1.0, lr=0.1, top1=top1, many=0, medium=0, few=0,
                        ece=0, ece_many=0, ece_medium=0, ece_few=0, train_seconds=1, images_per_second=1)


@pytest.fixture
def database_url(tmp_path) -> str:
    url = f"sqlite:///{tmp_path / 'h2t.db'}"
    upgrade_head(url)
    return url


def test_the_run_list_costs_two_queries_whatever_the_number_of_runs(database_url):
    with session_scope(database_url) as session:
        dataset = DatasetRow(name="d", spec={"builtin": "digits"}, class_names=["a", "b"], train_counts=[2, 1],
                             test_counts=[1, 1], image_size=16)
        session.add(dataset)
        session.flush()
        runs = [RunRow(dataset_id=dataset.id, config=RunConfig().model_dump(mode="json")) for _ in range(6)]
        session.add_all(runs)
        session.flush()
        for i, run in enumerate(runs[:4]):  # runs 0-3 have epochs; the newest (stage, epoch) is (2, i)
            for stage, epoch in [(1, 1), (1, 3), *[(2, e) for e in range(1, i + 1)]]:
                session.add(MetricRow(run_id=run.id, stage=stage, epoch=epoch,
                                      values=_epoch(stage, epoch, top1=stage / 10 + epoch / 100).model_dump()))
        session.add(ModelRow(run_id=runs[3].id, onnx_path="runs/x/model.onnx", sha256="0" * 64, size_bytes=1,
                             parity_max_abs_diff=0, parity_images=0, input_spec={}, class_names=["a", "b"],
                             groups=["many", "few"], calibration={}))
        ids = [run.id for run in runs]

    statements: list[str] = []

    def count(_connection, _cursor, statement, *_args) -> None:
        statements.append(statement)

    with session_scope(database_url) as session:
        rows = [session.get(RunRow, run_id) for run_id in ids]
        event.listen(get_engine(database_url), "before_cursor_execute", count)
        try:
            public = service.to_public_many(session, rows)
        finally:
            event.remove(get_engine(database_url), "before_cursor_execute", count)
    assert len(statements) == 2
    latest = [(p.latest_metrics.stage, p.latest_metrics.epoch) if p.latest_metrics else None for p in public]
    assert latest == [(1, 3), (2, 1), (2, 2), (2, 3), None, None]
    assert public[2].latest_metrics.top1 == pytest.approx(0.22)
    assert [p.model_id for p in public] == [None, None, None, ids[3], None, None]
