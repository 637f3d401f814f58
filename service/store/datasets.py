"""The dataset scan's state: scanning -> ready | failed. Functions take the session and never commit.

A scan is idempotent and every change is a compare-and-set on `scanning`, so a scan delivered twice
(a redelivery, or a resend by the sweep while the first is still reading) records one outcome and the
second changes nothing.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from service.store.orm import DatasetRow, DatasetStatus


def _from_scanning(session: Session, dataset_id: str, **values: object) -> bool:
    query = (update(DatasetRow).where(DatasetRow.id == dataset_id, DatasetRow.status == DatasetStatus.scanning)
             .values(**values).execution_options(synchronize_session=False))
    return session.execute(query).rowcount == 1


def scanning_spec(session: Session, dataset_id: str) -> dict | None:
    """The spec of a dataset waiting for its scan, or None (deleted, or already scanned)."""
    row = session.get(DatasetRow, dataset_id)
    return row.spec if row is not None and row.status == DatasetStatus.scanning else None


UNREADABLE_LISTED = 1000  # files a dataset row lists of those its scan left out; it counts all of them


def scanned(session: Session, dataset_id: str, class_names: list[str], train_counts: list[int],
            test_counts: list[int], unreadable: list[dict]) -> bool:
    """Record the scan's index; a group definition whose slices do not fit the classes found fails the dataset."""
    row = session.get(DatasetRow, dataset_id)
    if row is not None:
        try:
            row.group_config().check_classes(len(class_names))
        except ValueError as exc:
            return scan_failed(session, dataset_id, f"{exc} (found {len(class_names)} classes)")
    return _from_scanning(session, dataset_id, status=DatasetStatus.ready, class_names=class_names,
                          train_counts=train_counts, test_counts=test_counts,
                          unreadable=unreadable[:UNREADABLE_LISTED], unreadable_count=len(unreadable))


def scan_failed(session: Session, dataset_id: str, error: str) -> bool:
    return _from_scanning(session, dataset_id, status=DatasetStatus.failed, error=error)


def unsent_scans(session: Session, now: datetime, resend_after_s: float) -> list[str]:
    """Datasets still scanning `resend_after_s` after they were last sent (the message may be lost): marked
    as sent now; the caller sends them after commit."""
    rows = session.scalars(select(DatasetRow).where(
        DatasetRow.status == DatasetStatus.scanning,
        func.coalesce(DatasetRow.enqueued_at, DatasetRow.created_at) < now - timedelta(seconds=resend_after_s),
    ).with_for_update(skip_locked=True)).all()
    for row in rows:
        row.enqueued_at = now
    session.flush()
    return [row.id for row in rows]
