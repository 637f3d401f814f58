"""Scan one dataset by reference: read its index under the data root (no pixels decoded) and record
`ready` with its counts and unreadable files, or `failed` with why. Idempotent: a dataset that is no
longer scanning (scanned by an earlier delivery, or deleted) is skipped."""

from __future__ import annotations

import logging
from dataclasses import asdict

from models.contract.config import DATASET_SPEC
from models.contract.reference import DatasetUnavailable, scan_reference
from service.store import datasets
from service.store.settings import Settings
from worker.runner import in_store

log = logging.getLogger("h2t.worker")


def scan_dataset(dataset_id: str, settings: Settings) -> str:
    """The task body; returns what it did (skipped, ready, failed)."""
    spec = in_store(settings, lambda session: datasets.scanning_spec(session, dataset_id),
                    f"reading dataset {dataset_id}")
    if spec is None:
        log.info("dataset %s is not waiting for a scan: skipped", dataset_id)
        return "skipped"
    try:
        index = scan_reference(DATASET_SPEC.validate_python(spec), settings.data_root)
    except (DatasetUnavailable, OSError, UnicodeDecodeError) as exc:
        error = str(exc) if isinstance(exc, DatasetUnavailable) else f"{type(exc).__name__}: {exc}"
        log.warning("dataset %s failed its scan: %s", dataset_id, error)
        in_store(settings, lambda session: datasets.scan_failed(session, dataset_id, error),
                 f"recording the failed scan of dataset {dataset_id}")
        return "failed"
    in_store(settings, lambda session: datasets.scanned(
        session, dataset_id, list(index.class_names), index.counts("train"), index.counts("test"),
        [asdict(entry) for entry in index.unreadable]), f"recording the scan of dataset {dataset_id}")
    log.info("dataset %s scanned: %d classes, %d train / %d test images, %d unreadable", dataset_id,
             len(index.class_names), len(index.splits["train"]), len(index.splits["test"]), len(index.unreadable))
    return "ready"
