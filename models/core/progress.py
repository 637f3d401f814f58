"""Progress inside an epoch: what the training loop reports every few seconds, and its time estimates.

The loop ticks a `ProgressClock` after every step; the clock reports a `StepProgress` at most every
`interval_s` seconds of host time, so reporting costs no device synchronisation. A report is also the
loop's chance to stop between steps: a callback that raises (e.g. TrainingCancelled) ends the epoch there,
and the last checkpoint stays the run's.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from models.contract.metrics import StepProgress

PROGRESS_INTERVAL_S = 2.0

ProgressCallback = Callable[[StepProgress], None]


def estimate_progress(stage: int, epoch: int, epochs: int, step: int, steps: int, images: int, elapsed_s: float,
                      epoch_s: float | None, later_epochs: int) -> StepProgress:
    """Where a stage stands after `step` of `steps` of its 0-based `epoch`, `elapsed_s` into it.

    An epoch's time is the last whole epoch's (training, evaluation and checkpoint) when there was one in
    this call, else this epoch's training pace extrapolated; `later_epochs` (the epochs of the stages after
    this one) are counted at the same time."""
    per_step = elapsed_s / max(step, 1)
    epoch_time = epoch_s if epoch_s is not None else per_step * steps
    stage_eta = per_step * (steps - step) + (epochs - epoch - 1) * epoch_time
    return StepProgress(stage=stage, epoch=epoch + 1, epochs=epochs, step=step, steps=steps,
                        images_per_second=images / elapsed_s if elapsed_s > 0 else 0.0,
                        stage_eta_s=stage_eta, run_eta_s=stage_eta + later_epochs * epoch_time)


class ProgressClock:
    """Ticked after each step of one epoch; calls `report` at most every `interval_s` seconds."""

    def __init__(self, report: ProgressCallback, stage: int, epoch: int, epochs: int, epoch_s: float | None,
                 later_epochs: int, interval_s: float = PROGRESS_INTERVAL_S,
                 now: Callable[[], float] = time.monotonic) -> None:
        self.report, self.stage, self.epoch, self.epochs = report, stage, epoch, epochs
        self.epoch_s, self.later_epochs, self.interval_s, self.now = epoch_s, later_epochs, interval_s, now
        self.started = self.last = now()

    def tick(self, step: int, steps: int, images: int) -> None:
        now = self.now()
        if now - self.last < self.interval_s:
            return
        self.last = now
        self.report(estimate_progress(self.stage, self.epoch, self.epochs, step, steps, images, now - self.started,
                                      self.epoch_s, self.later_epochs))
