"""The registry of training workers: how many devices each worker process owns, as it last announced.
Workers announce themselves when they start and with every sweep; the API refuses a run asking for more
devices than any worker heard of recently owns."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from service.store.errors import InvalidInput
from service.store.orm import WorkerRow


def announce(session: Session, name: str, devices: int, device_type: str, now: datetime) -> None:
    row = session.get(WorkerRow, name)
    if row is None:
        session.add(WorkerRow(name=name, devices=devices, device_type=device_type, started_at=now, seen_at=now))
    else:
        row.devices, row.device_type, row.seen_at = devices, device_type, now
    session.flush()


def most_devices(session: Session, seen_after: datetime) -> int:
    """The most devices any worker heard of since `seen_after` owns; 0 when none was."""
    return session.scalar(select(func.max(WorkerRow.devices)).where(WorkerRow.seen_at >= seen_after)) or 0


def forget(session: Session, seen_before: datetime) -> int:
    """Drop workers not heard of since `seen_before` (stopped or replaced long ago)."""
    return session.execute(delete(WorkerRow).where(WorkerRow.seen_at < seen_before)).rowcount


def check_devices(session: Session, devices: int, now: datetime, within_s: float) -> None:
    """A run on one device fits any worker; a run on more needs a worker that owns that many."""
    if devices == 1:
        return
    largest = most_devices(session, now - timedelta(seconds=within_s))
    if largest < devices:
        seen = (f"the largest worker seen in the last {within_s / 3600:g} h owns {largest}" if largest
                else f"no worker has announced itself in the last {within_s / 3600:g} h")
        raise InvalidInput(f"devices: this run asks for {devices} devices on one host, but {seen}; ask for fewer, "
                           f"or start a worker that owns {devices} (H2T_WORKER_DEVICES)")
