"""The worker's task body and the claim/sweep rules, in-process on a SQLite store (no servers)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from models.contract.config import RunConfig
from service.api.runs import service as runs
from service.store.db import session_scope
from service.store.migrate import upgrade_head
from service.store.orm import DatasetRow, ModelRow, RunRow, RunStatus, utcnow
from service.store.settings import Settings
from worker import runner

TINY = {"augment": {"horizontal_flip": False},
        "stage1": {"epochs": 2, "batch_size": 64, "warmup_epochs": 1, "milestones": []},
        "stage2": {"epochs": 1, "batch_size": 64}}


@pytest.fixture
def settings(tmp_path) -> Settings:
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'h2t.db'}", broker_url="memory://",
                        artifact_dir=tmp_path / "artifacts", api_keys=("k",))
    upgrade_head(settings.database_url)
    return settings


def _queued_run(settings: Settings, **config) -> str:
    with session_scope(settings.database_url) as session:
        dataset = DatasetRow(name="digits", kind="builtin", spec={"builtin": "digits", "imbalance_factor": 0.05},
                             class_names=[str(i) for i in range(10)], train_counts=[1] * 10, test_counts=[1] * 10,
                             image_size=16)
        session.add(dataset)
        session.flush()
        run = RunRow(dataset_id=dataset.id, config=RunConfig.model_validate(config).model_dump(mode="json"))
        session.add(run)
        session.flush()
        return run.id


def _run(settings: Settings, run_id: str) -> RunRow:
    with session_scope(settings.database_url) as session:
        return session.get(RunRow, run_id)


def test_the_task_body_trains_exports_and_registers_the_model(settings):
    run_id = _queued_run(settings, **TINY)
    assert runner.train_run(run_id, settings, "test-worker") == "succeeded"
    with session_scope(settings.database_url) as session:
        model = session.get(ModelRow, run_id)
        assert model is not None and model.parity_max_abs_diff < 1e-4
        assert set(model.calibration["groups"]) == {"overall", "many", "medium", "few"}
    assert runner.train_run(run_id, settings, "test-worker") == "skipped"  # a redelivered task does nothing


def test_a_failed_export_fails_the_run_with_a_clear_error(settings, monkeypatch):
    import models.core.export

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(models.core.export, "export_and_calibrate", broken)
    run_id = _queued_run(settings, **TINY)
    assert runner.train_run(run_id, settings, "test-worker") == "failed"
    run = _run(settings, run_id)
    assert run.status == RunStatus.failed and run.error == "ONNX export failed: RuntimeError: disk full"
    with session_scope(settings.database_url) as session:
        assert session.get(ModelRow, run_id) is None


def test_a_run_is_claimed_once_until_its_heartbeat_goes_stale(settings):
    run_id = _queued_run(settings)
    now = utcnow()
    with session_scope(settings.database_url) as session:
        assert runs.claim(session, run_id, "a", "w1", now, now - timedelta(seconds=60))
    with session_scope(settings.database_url) as session:
        assert not runs.claim(session, run_id, "b", "w2", now, now - timedelta(seconds=60))
    later = now + timedelta(seconds=120)
    with session_scope(settings.database_url) as session:  # w1 went silent for longer than the timeout
        assert runs.claim(session, run_id, "b", "w2", later, later - timedelta(seconds=60))
    with session_scope(settings.database_url) as session:  # w1 lost its claim: its writes are refused
        assert not runs.heartbeat(session, run_id, "a", later)
        assert runs.record_epoch(session, run_id, "a", {}) is None
    assert _run(settings, run_id).attempts == 2


def test_the_sweep_requeues_stale_runs_then_fails_them_and_finishes_cancelling_ones(settings):
    ids = [_queued_run(settings) for _ in range(3)]
    old = utcnow() - timedelta(hours=1)
    with session_scope(settings.database_url) as session:
        for run_id, (status, attempts) in zip(ids, [(RunStatus.running, 1), (RunStatus.running, 3),
                                                     (RunStatus.cancelling, 1)], strict=True):
            row = session.get(RunRow, run_id)
            row.status, row.attempts, row.heartbeat_at, row.claim_token = status, attempts, old, "t"
    with session_scope(settings.database_url) as session:
        requeued = runs.sweep_stale(session, utcnow(), timeout_s=60, max_attempts=3)
    assert requeued == [ids[0]]
    assert _run(settings, ids[0]).status == RunStatus.queued
    assert _run(settings, ids[1]).status == RunStatus.failed and "worker lost 3 times" in _run(settings, ids[1]).error
    assert _run(settings, ids[2]).status == RunStatus.cancelled
