"""Progress inside an epoch: the time estimates, and how often the loop reports."""

from __future__ import annotations

import pytest

from models.contract.reporting import duration, progress_line
from models.core.progress import ProgressClock, estimate_progress


def test_estimates_extrapolate_this_epoch_until_a_whole_epoch_was_timed():
    # 0-based epoch 2 of 10, 20 of 80 steps done in 5 s (0.25 s a step), 2560 images; 4 epochs of stage 2 after
    p = estimate_progress(1, 2, 10, 20, 80, 2560, 5.0, None, 4)
    assert (p.stage, p.epoch, p.epochs, p.step, p.steps) == (1, 3, 10, 20, 80)
    assert p.images_per_second == pytest.approx(512)
    assert p.stage_eta_s == pytest.approx(60 * 0.25 + 7 * 80 * 0.25)  # the rest of this epoch + 7 epochs of 20 s
    assert p.run_eta_s == pytest.approx(p.stage_eta_s + 4 * 20)
    timed = estimate_progress(1, 2, 10, 20, 80, 2560, 5.0, 30.0, 4)  # the last epoch took 30 s with its evaluation
    assert timed.stage_eta_s == pytest.approx(15 + 7 * 30) and timed.run_eta_s == pytest.approx(15 + 11 * 30)


def test_the_clock_reports_at_most_once_per_interval():
    now = [0.0]
    reports = []
    clock = ProgressClock(reports.append, stage=2, epoch=0, epochs=3, epoch_s=None, later_epochs=0, interval_s=2.0,
                          now=lambda: now[0])
    for step, at in enumerate([0.5, 1.0, 2.1, 3.0, 4.0, 4.2], start=1):
        now[0] = at
        clock.tick(step, 6, 10 * step)
    # at 4.0 s only 1.9 s have passed since the last report at 2.1 s
    assert [(r.step, r.images_per_second) for r in reports] == [(3, pytest.approx(30 / 2.1)),
                                                                (6, pytest.approx(60 / 4.2))]


def test_progress_lines_are_short_and_readable():
    p = estimate_progress(1, 0, 200, 40, 85, 5120, 8.0, None, 10)
    assert progress_line(p) == "stage 1 epoch   1/200 step 40/85 640 img/s, stage ETA 56m32s, run ETA 59m22s"
    assert (duration(9.4), duration(760), duration(11100)) == ("9s", "12m40s", "3h05m")
