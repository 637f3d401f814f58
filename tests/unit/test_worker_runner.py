"""The worker's task body and the claim/sweep rules, in-process on a SQLite store (no servers)."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import numpy as np
import pytest
import sqlalchemy.exc

from models.contract.config import RunConfig
from models.contract.metrics import EpochMetrics, evaluate_predictions
from models.contract.onnx_model import ModelSpec
from service.store import runs
from service.store.db import session_scope
from service.store.errors import ResourceConflict
from service.store.migrate import upgrade_head
from service.store.orm import ArtifactRow, DatasetRow, MetricRow, ModelRow, RunRow, RunStatus, utcnow
from service.store.queue import make_celery
from service.store.runs import ExportedModel, StoredFile
from service.store.settings import Settings
from service.store.sweep import sweep_once
from tests.helpers import tiny_run_config
from worker import runner

TINY = tiny_run_config(stage1={"epochs": 2}, stage2={"epochs": 1})


@pytest.fixture
def settings(tmp_path) -> Settings:
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'h2t.db'}", broker_url="memory://",
                        artifact_dir=tmp_path / "artifacts", api_keys=("k",))
    upgrade_head(settings.database_url)
    return settings


def _queued_run(settings: Settings, **config) -> str:
    with session_scope(settings.database_url) as session:
        dataset = DatasetRow(name="digits", spec={"builtin": "digits", "imbalance_factor": 0.05},
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
    assert runner.train_run(run_id, settings, "test-worker", threading.Event()) == runner.Outcome.succeeded
    with session_scope(settings.database_url) as session:
        model = session.get(ModelRow, run_id)
        assert model is not None and model.parity_max_abs_diff < 1e-4
        assert set(model.calibration["groups"]) == {"overall", "many", "medium", "few"}
        kinds = {a.kind: a.path for a in session.query(ArtifactRow).filter_by(run_id=run_id)}
    # every stored path is relative to the artifact store, so another mount point finds the same files
    assert kinds == {"onnx": f"runs/{run_id}/model.onnx",
                     "stage1_checkpoint": f"runs/{run_id}/stage1/checkpoint.pt",
                     "stage2_checkpoint": f"runs/{run_id}/stage2/checkpoint.pt"}
    assert model.onnx_path == kinds["onnx"]
    run = _run(settings, run_id)  # progress ends on stage 2's last epoch (TINY: 2 + 1 epochs)
    assert (run.stage, run.epoch, run.total_epochs) == (2, 1, 1)
    # a redelivered task does nothing
    assert runner.train_run(run_id, settings, "test-worker", threading.Event()) == runner.Outcome.skipped


def test_a_failed_export_fails_the_run_with_a_clear_error(settings, monkeypatch):
    import models.core.export

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(models.core.export, "export_and_calibrate", broken)
    run_id = _queued_run(settings, **TINY)
    assert runner.train_run(run_id, settings, "test-worker", threading.Event()) == runner.Outcome.failed
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
        epoch = EpochMetrics(stage=1, epoch=1, epochs=1, loss=0, lr=0, top1=0, many=0, medium=0, few=0, ece=0,
                             ece_many=0, ece_medium=0, ece_few=0, train_seconds=0, images_per_second=0)
        assert runs.record_epoch(session, run_id, "a", epoch) is None
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
        requeued = runs.sweep_stale(session, utcnow(), timeout_s=60, max_attempts=3, resend_after_s=600)
    assert requeued == [ids[0]]
    assert _run(settings, ids[0]).status == RunStatus.queued
    assert _run(settings, ids[1]).status == RunStatus.failed and "worker lost 3 times" in _run(settings, ids[1]).error
    assert _run(settings, ids[2]).status == RunStatus.cancelled


def test_a_stop_request_checkpoints_requeues_and_the_next_delivery_resumes(settings):
    run_id = _queued_run(settings, **TINY)
    stop, sent = threading.Event(), []
    stop.set()  # as SIGTERM does: stop after the next checkpoint
    assert runner.train_run(run_id, settings, "w1", stop, lambda *sent_run: sent.append(sent_run)) == \
        runner.Outcome.requeued
    assert (_run(settings, run_id).stage, _run(settings, run_id).total_epochs) == (1, 2)
    assert sent == [(run_id, 1)]  # (run, devices): to the queue of runs on one device
    run = _run(settings, run_id)
    assert (run.status, run.stage, run.epoch, run.claim_token) == (RunStatus.queued, 1, 1, None)
    assert runner.train_run(run_id, settings, "w2", threading.Event()) == runner.Outcome.succeeded
    with session_scope(settings.database_url) as session:
        keys = [(m.stage, m.epoch) for m in session.query(MetricRow).filter_by(run_id=run_id)]
    assert sorted(keys) == [(1, 1), (1, 2), (2, 1)]


def test_a_run_resumed_after_its_worker_died_keeps_its_progress(settings, monkeypatch):
    """A worker killed after every epoch was recorded (during the export): the next claim has nothing left
    to train, so no epoch reports progress again; it must still read stage 2, last epoch, not go back to
    stage 1 epoch 0 (found by benchmarks/soak_worker_kills.py: succeeded runs showing stage 1, epoch 0)."""
    import models.core.export

    run_id = _queued_run(settings, **TINY)
    export = models.core.export.export_and_calibrate

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # stands for SIGKILL: nothing of the task body runs after this point

    monkeypatch.setattr(models.core.export, "export_and_calibrate", killed)
    with pytest.raises(KeyboardInterrupt):
        runner.train_run(run_id, settings, "w1", threading.Event())
    run = _run(settings, run_id)
    assert (run.status, run.stage, run.epoch, run.total_epochs) == (RunStatus.running, 2, 1, 1)
    monkeypatch.setattr(models.core.export, "export_and_calibrate", export)
    with session_scope(settings.database_url) as session:  # w1 is silent: its claim goes stale
        session.get(RunRow, run_id).heartbeat_at = utcnow() - timedelta(seconds=settings.heartbeat_timeout_s + 1)

    recorded = []
    monkeypatch.setattr(runs, "record_epoch", lambda *args: recorded.append(args) or RunStatus.running)
    assert runner.train_run(run_id, settings, "w2", threading.Event()) == runner.Outcome.succeeded
    assert recorded == []  # the resume trained nothing: both stages were checkpointed
    run = _run(settings, run_id)
    assert (run.status, run.stage, run.epoch, run.total_epochs, run.attempts) == (RunStatus.succeeded, 2, 1, 1, 2)


def _exported(run_id: str) -> ExportedModel:
    onnx = StoredFile("onnx", f"runs/{run_id}/model.onnx", 1, "0" * 64)
    spec = ModelSpec(16, (0.5,) * 3, (0.5,) * 3, ("a", "b"), ("many", "few"))
    report = evaluate_predictions(np.eye(2), np.arange(2), ["many", "few"])
    return ExportedModel(onnx, spec, 0.0, 0, report)


def test_a_cancel_that_arrives_during_training_is_never_undone_by_the_run_finishing(settings):
    run_id, now = _queued_run(settings), utcnow()
    with session_scope(settings.database_url) as session:
        assert runs.claim(session, run_id, "t", "w1", now, now - timedelta(seconds=60))
    with session_scope(settings.database_url) as session:
        assert runs.cancel(session, run_id).status == RunStatus.cancelling
    with session_scope(settings.database_url) as session:  # cancelling again changes nothing
        assert runs.cancel(session, run_id).status == RunStatus.cancelling
    with session_scope(settings.database_url) as session:  # the training finished before it saw the cancel
        assert runs.succeed(session, run_id, "t", _exported(run_id), []) == RunStatus.cancelled
    run = _run(settings, run_id)
    assert (run.status, run.claim_token) == (RunStatus.cancelled, None) and run.finished_at is not None
    with session_scope(settings.database_url) as session:
        assert session.get(ModelRow, run_id) is None and session.query(ArtifactRow).count() == 0
        with pytest.raises(ResourceConflict):
            runs.cancel(session, run_id)


def test_a_cancelled_queued_run_cannot_be_claimed_and_a_finished_run_cannot_be_cancelled(settings):
    cancelled, finished, now = _queued_run(settings), _queued_run(settings), utcnow()
    with session_scope(settings.database_url) as session:
        assert runs.cancel(session, cancelled).status == RunStatus.cancelled
        assert not runs.claim(session, cancelled, "t", "w1", now, now - timedelta(seconds=60))
        assert runs.claim(session, finished, "t", "w1", now, now - timedelta(seconds=60))
        assert runs.succeed(session, finished, "t", _exported(finished), []) == RunStatus.succeeded
        assert runs.finish(session, finished, "t", RunStatus.failed) is None  # the claim ended with the run
    with session_scope(settings.database_url) as session, pytest.raises(ResourceConflict):
        runs.cancel(session, finished)
    assert _run(settings, finished).status == RunStatus.succeeded


def test_the_sweep_resends_runs_queued_too_long_once_per_interval(settings):
    """A broker that lost its messages (restart without persistence, a claim that failed and was acked)
    cannot strand a run: the store says it is queued, so the sweep sends it again."""
    lost, fresh = _queued_run(settings), _queued_run(settings)
    now = utcnow()
    with session_scope(settings.database_url) as session:
        session.get(RunRow, lost).enqueued_at = now - timedelta(minutes=20)
        session.get(RunRow, fresh).enqueued_at = now - timedelta(minutes=1)
    with session_scope(settings.database_url) as session:
        assert runs.sweep_stale(session, now, timeout_s=60, max_attempts=3, resend_after_s=600) == [lost]
    with session_scope(settings.database_url) as session:  # just sent: not again until the interval passes
        assert runs.sweep_stale(session, now + timedelta(minutes=5), timeout_s=60, max_attempts=3,
                                resend_after_s=600) == []
    with session_scope(settings.database_url) as session:
        later = runs.sweep_stale(session, now + timedelta(minutes=11), timeout_s=60, max_attempts=3,
                                 resend_after_s=600)
    assert sorted(later) == sorted([lost, fresh])


def _failing_twice(write, failures: list[str]):
    def flaky(*args, **kwargs):
        if len(failures) < 2:  # the first two calls find the database gone
            failures.append(write.__name__)
            raise sqlalchemy.exc.OperationalError("UPDATE", {}, ConnectionError("server closed the connection"))
        return write(*args, **kwargs)

    return flaky


@pytest.mark.parametrize("write", ["claim", "record_epoch"])
def test_a_database_blip_while_claiming_or_recording_is_retried_not_fatal(settings, monkeypatch, write):
    failures: list[str] = []
    monkeypatch.setattr(runs, write, _failing_twice(getattr(runs, write), failures))
    monkeypatch.setattr(runner, "STORE_RETRY_DELAYS_S", (0.01, 0.01, 0.01))
    run_id = _queued_run(settings, **TINY)
    assert runner.train_run(run_id, settings, "w1", threading.Event()) == runner.Outcome.succeeded
    assert failures == [write, write] and _run(settings, run_id).attempts == 1
    with session_scope(settings.database_url) as session:
        keys = sorted((m.stage, m.epoch) for m in session.query(MetricRow).filter_by(run_id=run_id))
    assert keys == [(1, 1), (1, 2), (2, 1)]


def test_after_the_store_was_unreachable_the_sweep_gives_every_worker_a_full_timeout_to_beat_again(
        settings, monkeypatch):
    """An outage longer than the heartbeat timeout leaves every claim looking stale when the store is back,
    though the workers were alive (the store could not take their heartbeats): the sweep declares none
    lost until the store has been reachable for a whole timeout, then only those still silent."""
    settings = settings.model_copy(update={"heartbeat_interval_s": 0.1, "heartbeat_timeout_s": 0.5})
    celery = make_celery(settings)
    alive, dead = _queued_run(settings), _queued_run(settings)
    before_outage = utcnow() - timedelta(seconds=20)  # the last beats the store took
    with session_scope(settings.database_url) as session:
        for run_id in (alive, dead):
            assert runs.claim(session, run_id, run_id, "w", before_outage, before_outage)
    failures: list[str] = []
    monkeypatch.setattr(runs, "sweep_stale", _failing_twice(runs.sweep_stale, failures))
    for _ in range(2):  # the sweeps during the outage
        with pytest.raises(sqlalchemy.exc.OperationalError):
            sweep_once(settings, celery)
    assert sweep_once(settings, celery) == []  # the store is back: both heartbeats are 20 s old, neither is judged
    with session_scope(settings.database_url) as session:  # one worker beats again
        assert runs.heartbeat(session, alive, alive, utcnow())
    time.sleep(0.3)
    assert sweep_once(settings, celery) == []
    time.sleep(0.3)  # the store has been reachable for longer than the timeout: silence is silence again
    with session_scope(settings.database_url) as session:
        assert runs.heartbeat(session, alive, alive, utcnow())
    assert sweep_once(settings, celery) == [dead]
    assert (_run(settings, alive).status, _run(settings, alive).attempts) == (RunStatus.running, 1)
    assert _run(settings, dead).status == RunStatus.queued
