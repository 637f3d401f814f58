"""What a builtin dataset holds (class names, per-class counts) without loading images or torch.

The API describes datasets with this; `models.core.data` builds the tensors with the same counts.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.contract.config import BuiltinDataset

# folder, train files, test file, meta file, label key, class-name key
CIFAR_LAYOUT = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch",
                "batches.meta", "labels", "label_names"),
    "cifar100": ("cifar-100-python", ["train"], "test", "meta", "fine_labels", "fine_label_names"),
}
CIFAR_TRAIN_PER_CLASS = {"cifar10": 5000, "cifar100": 500}

# the file suffixes read as images in ImageFolder trees and uploaded archives
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")

# The embedded demo dataset: scikit-learn's 1,797 real 8x8 handwritten digits (UCI), which ship inside
# the scikit-learn wheel, so no download is ever needed. 30 test images per class; the rest feed a
# long-tailed training split with up to DIGITS_N_MAX images per class, upsampled to DIGITS_SIZE.
DIGITS_TEST_PER_CLASS = 30
DIGITS_N_MAX = 144
DIGITS_SIZE = 16
DIGITS_CLASS_NAMES = tuple(str(d) for d in range(10))


@dataclass(frozen=True)
class DatasetSummary:
    class_names: tuple[str, ...]
    train_counts: tuple[int, ...]
    test_counts: tuple[int, ...]
    image_size: int


def long_tailed_counts(n_max: int, num_classes: int, imbalance_factor: float, profile: str) -> list[int]:
    """Images kept per class, in label order (LDAM-DRW / H2T construction)."""
    if profile == "exp":
        return [int(n_max * imbalance_factor ** (i / (num_classes - 1.0))) for i in range(num_classes)]
    if profile == "step":
        half = num_classes // 2
        return [n_max] * half + [int(n_max * imbalance_factor)] * (num_classes - half)
    raise ValueError(f"unknown imbalance profile {profile!r}; expected 'exp' or 'step'")


def long_tailed_indices(labels: np.ndarray, counts: list[int], seed: int = 0) -> np.ndarray:
    """Per class in label order: shuffle that class's indices with one seeded stream, keep the first n_c.

    Same draws as `np.random.seed(seed)` followed by `np.random.shuffle` per class in the official code.
    """
    rng = np.random.RandomState(seed)
    kept = []
    for cls, n in enumerate(counts):
        idx = np.where(labels == cls)[0]
        if n > len(idx):
            raise ValueError(f"class {cls} has {len(idx)} images, cannot keep {n}")
        rng.shuffle(idx)
        kept.append(idx[:n])
    return np.concatenate(kept)


def unused_validation_indices(labels: np.ndarray, kept: np.ndarray, per_class: int, seed: int = 0) -> np.ndarray:
    """Indices (into `labels`) of up to `per_class` images of each class that a long-tailed subset (`kept`)
    left out, drawn without replacement with a stream of its own: a builtin set's `unused` validation split."""
    left = np.setdiff1d(np.arange(len(labels)), kept)
    rng = np.random.default_rng([seed, 1])
    chosen = [rng.permutation(left[labels[left] == c])[:per_class] for c in np.unique(labels[left])]
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")


def cifar100_pixels(root: str | Path, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """CIFAR-100's `train` or `test` pickle under `root` as (N x 32 x 32 x 3 uint8 RGB, fine labels, class names):
    the form image files are written from."""
    base = cifar_folder(root, "cifar100")
    batch = unpickle(base / split)
    images = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, np.asarray(batch["fine_labels"]), list(unpickle(base / "meta")["fine_label_names"])


def cifar_folder(root: str | Path, name: str) -> Path:
    if name not in CIFAR_LAYOUT:
        raise ValueError(f"unknown CIFAR variant {name!r}; expected one of {sorted(CIFAR_LAYOUT)}")
    return Path(root) / CIFAR_LAYOUT[name][0]


def cifar_available(root: str | Path, name: str) -> bool:
    folder, train_files, test_file, meta_file, *_ = CIFAR_LAYOUT[name]
    base = Path(root) / folder
    return all((base / f).exists() for f in [*train_files, test_file, meta_file])


def describe_builtin(spec: BuiltinDataset, data_root: str | Path | None) -> DatasetSummary:
    """Class names and exact per-class counts of a builtin long-tailed dataset."""
    if spec.builtin == "digits":
        counts = long_tailed_counts(DIGITS_N_MAX, len(DIGITS_CLASS_NAMES), spec.imbalance_factor, spec.profile)
        return DatasetSummary(DIGITS_CLASS_NAMES, tuple(counts), (DIGITS_TEST_PER_CLASS,) * len(DIGITS_CLASS_NAMES),
                              DIGITS_SIZE)
    if data_root is None or not cifar_available(data_root, spec.builtin):
        raise FileNotFoundError(f"{spec.builtin}: the CIFAR python files are not under the data root {data_root}")
    _, _, test_file, meta_file, label_key, names_key = CIFAR_LAYOUT[spec.builtin]
    base = cifar_folder(data_root, spec.builtin)
    names = tuple(unpickle(base / meta_file)[names_key])
    test_labels = np.asarray(unpickle(base / test_file)[label_key])
    counts = long_tailed_counts(CIFAR_TRAIN_PER_CLASS[spec.builtin], len(names), spec.imbalance_factor, spec.profile)
    return DatasetSummary(names, tuple(counts), tuple(np.bincount(test_labels, minlength=len(names)).tolist()), 32)
