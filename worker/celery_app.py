"""`h2t worker`: one Celery process (solo pool, one task at a time) per GPU."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading

from celery import Celery
from celery.signals import worker_ready

from service.store.queue import SCAN_TASK, TRAIN_TASK, enqueue_training, make_celery
from service.store.settings import Settings
from service.store.sweep import sweep_once

log = logging.getLogger("h2t.worker")


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def build_worker_app(settings: Settings, stop: threading.Event) -> Celery:
    """The Celery app with the training task; `stop` asks a running training to stop after its next
    checkpoint (set on SIGTERM)."""
    from worker.runner import train_run
    from worker.scan import scan_dataset

    app = make_celery(settings)

    @app.task(name=TRAIN_TASK)
    def train_run_task(run_id: str) -> str:
        return train_run(run_id, settings, worker_name(), stop, lambda rid: enqueue_training(app, settings, rid))

    @app.task(name=SCAN_TASK)
    def scan_dataset_task(dataset_id: str) -> str:
        return scan_dataset(dataset_id, settings)

    return app


def _stop_after_checkpoint_on_sigterm(stop: threading.Event) -> None:
    """Celery's warm shutdown waits for the running task, which may train for hours: also ask the
    training to stop after its next checkpoint; the run is then requeued for another worker."""
    celery_handler = signal.getsignal(signal.SIGTERM)

    def handler(signum: int, frame: object) -> None:
        stop.set()
        if callable(celery_handler):
            celery_handler(signum, frame)

    signal.signal(signal.SIGTERM, handler)


def _sweep_periodically(settings: Settings, app: Celery) -> None:
    """Every worker also looks for runs whose worker died, so none stays 'running' forever."""
    stop = threading.Event()
    while not stop.wait(settings.sweep_interval_s):
        try:
            sweep_once(settings, app)
        except Exception:
            log.exception("stale-run sweep failed")


def run_worker(settings: Settings, loglevel: str = "INFO") -> None:
    settings.ensure_local_dirs()
    stop = threading.Event()
    app = build_worker_app(settings, stop)

    @worker_ready.connect(weak=False)
    def _on_ready(**_: object) -> None:
        _stop_after_checkpoint_on_sigterm(stop)
        try:
            sweep_once(settings, app)
        except Exception:
            log.exception("start-up sweep failed")
        threading.Thread(target=_sweep_periodically, args=(settings, app), daemon=True, name="sweeper").start()

    app.worker_main(["worker", "--pool=solo", "--concurrency=1", f"--queues={settings.queue_name}",
                     f"--loglevel={loglevel}", f"--hostname=h2t@{socket.gethostname()}.{os.getpid()}",
                     "--without-gossip", "--without-mingle"])
