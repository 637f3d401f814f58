"""`h2t worker`: a Celery process (solo pool, one task at a time) that owns one or more devices, taking runs
that ask for up to that many; or, with H2T_WORKER_PROCESSES above 1, several of them sharing this host's
devices (small runs sharing a GPU)."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from datetime import timedelta

from celery import Celery
from celery.signals import worker_ready

from service.store import workers
from service.store.db import session_scope
from service.store.orm import utcnow
from service.store.queue import SCAN_TASK, TRAIN_TASK, enqueue_training, make_celery, training_queues
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
        return train_run(run_id, settings, worker_name(), stop,
                         lambda rid, devices: enqueue_training(app, settings, rid, devices))

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


def announce(settings: Settings, devices: int, device_type: str) -> None:
    """Tell the store what this worker owns (the API refuses runs asking for more than any worker owns) and
    forget workers not heard of for H2T_WORKER_SEEN_WITHIN_S."""
    now = utcnow()
    with session_scope(settings.database_url) as session:
        workers.announce(session, worker_name(), devices, device_type, now)
        workers.forget(session, now - timedelta(seconds=settings.worker_seen_within_s))


def _sweep_periodically(settings: Settings, app: Celery, devices: int, device_type: str) -> None:
    """Every worker also looks for runs whose worker died, so none stays 'running' forever, and announces
    itself again."""
    stop = threading.Event()
    while not stop.wait(settings.sweep_interval_s):
        _sweep_and_announce(settings, app, devices, device_type)


def _sweep_and_announce(settings: Settings, app: Celery, devices: int, device_type: str) -> None:
    # each on its own: a sweep must run (and fail) while the store is down, so that it knows the outage
    # when judging heartbeats afterwards (service/store/sweep.py)
    try:
        sweep_once(settings, app)
    except Exception:
        log.exception("stale-run sweep failed")
    try:
        announce(settings, devices, device_type)
    except Exception:
        log.exception("could not announce this worker's devices to the store")


RESTART_DELAY_S = 5.0  # before a worker process that died is started again


def run_worker_processes(count: int, loglevel: str) -> int:
    """Several workers on this host's devices (H2T_WORKER_PROCESSES): each a child `h2t worker` taking its own
    runs. SIGTERM and SIGINT are passed on to every child (each stops after its next checkpoint and requeues
    its run); a child that dies on its own is started again. Returns when all children have stopped."""
    import subprocess
    import sys
    import time

    command = [sys.executable, "-m", "h2t", "worker", "--log-level", loglevel]
    environment = {**os.environ, "H2T_WORKER_PROCESSES": "1"}
    stopping = threading.Event()
    children = [subprocess.Popen(command, env=environment) for _ in range(count)]

    def pass_on(signum: int, frame: object) -> None:
        stopping.set()
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, pass_on)
    signal.signal(signal.SIGINT, pass_on)
    log.info("started %d worker processes: %s", count, ", ".join(str(c.pid) for c in children))
    while True:
        for i, child in enumerate(children):
            if child.poll() is not None and not stopping.is_set():
                log.error("worker process %d exited with %s; starting it again in %.0f s", child.pid,
                          child.returncode, RESTART_DELAY_S)
                time.sleep(RESTART_DELAY_S)
                if not stopping.is_set():
                    children[i] = subprocess.Popen(command, env=environment)
        if stopping.is_set() and all(child.poll() is not None for child in children):
            return 0
        time.sleep(0.5)


def run_worker(settings: Settings, loglevel: str = "INFO") -> None:
    if settings.worker_processes > 1:
        raise SystemExit(run_worker_processes(settings.worker_processes, loglevel))
    from worker.runner import owned_devices

    settings.ensure_local_dirs()
    devices, device_type = owned_devices(settings)
    stop = threading.Event()
    app = build_worker_app(settings, stop)

    @worker_ready.connect(weak=False)
    def _on_ready(**_: object) -> None:
        _stop_after_checkpoint_on_sigterm(stop)
        _sweep_and_announce(settings, app, devices, device_type)
        threading.Thread(target=_sweep_periodically, args=(settings, app, devices, device_type), daemon=True,
                         name="sweeper").start()

    log.info("worker owns %d %s device(s)", devices, device_type)
    queues = ",".join(training_queues(settings, devices))
    app.worker_main(["worker", "--pool=solo", "--concurrency=1", f"--queues={queues}",
                     f"--loglevel={loglevel}", f"--hostname=h2t@{socket.gethostname()}.{os.getpid()}",
                     "--without-gossip", "--without-mingle"])
