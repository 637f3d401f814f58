"""Shared fixtures. CIFAR tests read ../shared/data (or $H2T_TEST_DATA_ROOT) and skip where it is absent."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.reference_data import ReferenceTree

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("H2T_TEST_DATA_ROOT", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def cifar_root() -> Path:
    if not (SHARED_DATA / "cifar-100-python" / "train").exists():
        pytest.skip(f"CIFAR-100 python files not found under {SHARED_DATA} (set H2T_TEST_DATA_ROOT)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def reference_root(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ReferenceTree]:
    """A data root holding the reference test dataset (tests/reference_data.py) under `lt/`, and `escape`:
    a symbolic link to a folder outside the root (a copy of `lt/` there)."""
    from tests.reference_data import write_reference_tree

    base = tmp_path_factory.mktemp("reference")
    root, outside = base / "data", base / "outside"
    root.mkdir()
    tree = write_reference_tree(root, SHARED_DATA)
    shutil.copytree(root / tree.folder, outside)
    (root / "escape").symlink_to(outside, target_is_directory=True)
    return root, tree
