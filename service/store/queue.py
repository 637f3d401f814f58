"""The Celery app and the task contracts between API and workers: `h2t.train_run(run_id)` and
`h2t.scan_dataset(dataset_id)`, both on the workers' queue (workers see the data root)."""

from __future__ import annotations

from celery import Celery

from service.store.settings import Settings

TRAIN_TASK = "h2t.train_run"
SCAN_TASK = "h2t.scan_dataset"


def make_celery(settings: Settings) -> Celery:
    app = Celery("h2t", broker=settings.broker_url, set_as_current=False)
    app.conf.update(
        task_ignore_result=True,  # progress and results live in the SQL store
        task_acks_late=True,  # a task whose worker dies is delivered again ...
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,  # ... and a busy worker holds no second long job
        task_default_queue=settings.queue_name,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_log_color=False,  # log lines are JSON, on a terminal too: no colour codes inside them
    )
    if settings.broker_url.startswith(("redis://", "rediss://")):
        # an unacknowledged task (its worker died) is delivered again after this long; the stale-run
        # sweep usually requeues it much sooner
        app.conf.broker_transport_options = {"visibility_timeout": 2 * 3600}
    return app


def training_queue(settings: Settings, devices: int) -> str:
    """The queue of runs asking for `devices`: a worker consumes the queues of every size up to what it owns,
    so a run never reaches a worker too small for it."""
    return settings.queue_name if devices == 1 else f"{settings.queue_name}.devices-{devices}"


def training_queues(settings: Settings, owned: int) -> list[str]:
    return [training_queue(settings, devices) for devices in range(1, owned + 1)]


def enqueue_training(app: Celery, settings: Settings, run_id: str, devices: int = 1) -> None:
    app.send_task(TRAIN_TASK, args=[run_id], queue=training_queue(settings, devices))


def enqueue_scan(app: Celery, settings: Settings, dataset_id: str) -> None:
    app.send_task(SCAN_TASK, args=[dataset_id], queue=settings.queue_name)
