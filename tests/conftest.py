"""Shared fixtures. CIFAR tests read ../shared/data (or $H2T_TEST_DATA_ROOT) and skip where it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("H2T_TEST_DATA_ROOT", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def cifar_root() -> Path:
    if not (SHARED_DATA / "cifar-100-python" / "train").exists():
        pytest.skip(f"CIFAR-100 python files not found under {SHARED_DATA} (set H2T_TEST_DATA_ROOT)")
    return SHARED_DATA
