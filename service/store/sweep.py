"""Requeue runs whose worker went silent and resend runs and dataset scans whose message may be lost.
Run by the API and by every worker, periodically."""

from __future__ import annotations

import logging
from datetime import datetime

import sqlalchemy.exc
from celery import Celery

from service.store import datasets, runs
from service.store.db import session_scope
from service.store.orm import utcnow
from service.store.queue import enqueue_scan, enqueue_training
from service.store.settings import Settings

log = logging.getLogger("h2t.sweeper")


# Per store URL, what this process's sweeps saw: when the store was found reachable again after a sweep
# failed to reach it (None while it is unreachable). A worker's heartbeats fail while the store is down,
# so right after an outage every claim looks stale: it gets a full heartbeat timeout to beat again
# before it is declared lost (runs.sweep_stale's store_back_at).
_store_back_at: dict[str, datetime | None] = {}


def sweep_once(settings: Settings, celery: Celery) -> list[str]:
    """Requeue (or fail, or finish cancelling) stale runs; send requeued ones to the broker after commit."""
    url, now = settings.database_url, utcnow()
    back_at = _store_back_at.get(url)
    if url in _store_back_at and back_at is None:  # the last sweep could not reach the store
        back_at = now
    try:
        with session_scope(url) as session:
            requeued = runs.sweep_stale(session, now, settings.heartbeat_timeout_s, settings.max_attempts,
                                        settings.resend_after_s, back_at)
            devices = {run_id: runs.requested_devices(session, run_id) for run_id in requeued}
            scans = datasets.unsent_scans(session, now, settings.resend_after_s)
    except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError):
        _store_back_at[url] = None
        raise
    if back_at is not None:
        _store_back_at[url] = back_at
    for run_id in requeued:
        try:
            enqueue_training(celery, settings, run_id, devices[run_id])
        except Exception:  # the run stays queued in the store: a later sweep sends it again
            log.exception("could not send run %s to the broker", run_id, extra={"run_id": run_id})
            continue
        log.warning("sent run %s to the broker again (its worker went silent or its message was lost)", run_id,
                    extra={"run_id": run_id})
    for dataset_id in scans:
        try:
            enqueue_scan(celery, settings, dataset_id)
        except Exception:  # it stays scanning in the store: a later sweep sends it again
            log.exception("could not send the scan of dataset %s to the broker", dataset_id)
            continue
        log.warning("sent the scan of dataset %s to the broker again (its message may be lost)", dataset_id)
    return requeued
