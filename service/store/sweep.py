"""Requeue runs whose worker went silent and resend runs whose message may be lost. Run by the API
and by every worker, periodically."""

from __future__ import annotations

import logging

from celery import Celery

from service.store import runs
from service.store.db import session_scope
from service.store.orm import utcnow
from service.store.queue import enqueue_training
from service.store.settings import Settings

log = logging.getLogger("h2t.sweeper")


def sweep_once(settings: Settings, celery: Celery) -> list[str]:
    """Requeue (or fail, or finish cancelling) stale runs; send requeued ones to the broker after commit."""
    with session_scope(settings.database_url) as session:
        requeued = runs.sweep_stale(session, utcnow(), settings.heartbeat_timeout_s, settings.max_attempts,
                                    settings.resend_after_s)
    for run_id in requeued:
        try:
            enqueue_training(celery, settings, run_id)
        except Exception:  # the run stays queued in the store: a later sweep sends it again
            log.exception("could not send run %s to the broker", run_id, extra={"run_id": run_id})
            continue
        log.warning("sent run %s to the broker again (its worker went silent or its message was lost)", run_id,
                    extra={"run_id": run_id})
    return requeued
