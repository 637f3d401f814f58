"""The layers of docs/architecture.md are import-linter contracts in pyproject.toml; the suite runs them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("models", "service", "worker", "h2t", "migrations")


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    """`lint-imports` over the packages under `root`, with the contracts of its pyproject.toml."""
    return subprocess.run(
        [sys.executable, "-c", "import sys, importlinter.cli; sys.exit(importlinter.cli.lint_imports(no_cache=True))"],
        cwd=root, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(root)})


def test_every_layer_contract_is_kept():
    result = _lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "7 kept, 0 broken" in result.stdout


def test_an_api_module_importing_the_training_core_breaks_a_contract(tmp_path):
    """The contracts bite: a copy of the code whose API imports the training core (and so torch) fails."""
    for name in PACKAGES:
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "service" / "api" / "sneaky.py").write_text("from models.core.train import run_stage\n")
    result = _lint_imports(tmp_path)
    assert result.returncode != 0
    assert "The API never imports torch or the training core BROKEN" in result.stdout
    assert "service.api.sneaky -> models.core.train" in result.stdout
