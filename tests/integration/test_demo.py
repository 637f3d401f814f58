"""The README's first command, shortened: API and worker processes on the embedded defaults."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_demo_runs_the_whole_system_on_embedded_defaults_and_prints_the_group_table(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "h2t", "demo", "--stage1-epochs", "3", "--stage2-epochs", "2"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HOME": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "POST /v1/datasets" in out and "run is succeeded" in out
    assert "stage 1 epoch   3/3" in out and "stage 2 epoch   2/2" in out
    table = out.split("from the stored metrics:")[1].strip().splitlines()[:5]
    assert [line.split()[0] for line in table] == ["group", "overall", "many", "medium", "few"]
    assert "/predict with 10 held-out test images" in out
    calibration = out.split("(GET .../calibration):")[1].strip().splitlines()
    assert [line.split()[0] for line in calibration[:5]] == ["group", "overall", "many", "medium", "few"]
    assert not list(tmp_path.glob("h2t-data"))  # the embedded demo leaves nothing in the working directory
