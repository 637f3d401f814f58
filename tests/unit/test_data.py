from pathlib import Path

import numpy as np
import pytest
import torch

from models.contract.config import DATASET_SPEC, ArchiveDataset, BuiltinDataset, FolderDataset
from models.contract.layout import ArtifactLayout
from models.contract.metrics import class_groups
from models.core.data import (
    digits_long_tailed,
    load_cifar,
    load_dataset,
    load_image_folder,
    long_tailed_counts,
    long_tailed_indices,
)


@pytest.mark.parametrize("factor, total", [(0.01, 10_847), (0.005, 9_502), (0.02, 12_608)])
def test_cifar100_lt_exp_counts_match_the_published_totals(factor, total):
    counts = long_tailed_counts(500, 100, factor, "exp")
    assert sum(counts) == total and counts[0] == 500 and counts[-1] == int(500 * factor)
    assert counts == sorted(counts, reverse=True)


def test_step_profile_halves_classes_into_n_max_and_n_max_times_factor():
    assert long_tailed_counts(500, 10, 0.1, "step") == [500] * 5 + [50] * 5


def test_unknown_profile_is_rejected():
    with pytest.raises(ValueError, match="profile"):
        long_tailed_counts(500, 10, 0.1, "linear")


def test_long_tailed_indices_replay_the_official_global_numpy_shuffle():
    labels = np.repeat(np.arange(5), 20)
    np.random.shuffle(labels)
    counts = [20, 10, 5, 3, 1]
    np.random.seed(0)  # what the official code does, through the global legacy generator
    expected = []
    for cls, n in enumerate(counts):
        idx = np.where(labels == cls)[0]
        np.random.shuffle(idx)
        expected.append(idx[:n])
    assert np.array_equal(long_tailed_indices(labels, counts, seed=0), np.concatenate(expected))


def test_cifar100_lt_at_factor_001_has_10847_images_and_35_35_30_groups(cifar_root):
    data = load_dataset(BuiltinDataset(builtin="cifar100", imbalance_factor=0.01), cifar_root)
    assert len(data.train) == 10_847 and len(data.test) == 10_000
    assert data.train.images.shape[1:] == (3, 32, 32) and data.train.images.dtype == torch.uint8
    counts = data.train_counts()
    assert counts[0] == 500 and counts[99] == 5 and data.test_counts() == [100] * 100
    groups = class_groups(counts)
    assert [groups.count(g) for g in ("many", "medium", "few")] == [35, 35, 30]
    assert data.class_names[:3] == ("apple", "aquarium_fish", "baby")


@pytest.mark.parametrize("factor, total", [(0.005, 9_502), (0.02, 12_608)])
def test_cifar100_lt_sizes_at_other_factors(cifar_root, factor, total):
    data = load_dataset(BuiltinDataset(builtin="cifar100", imbalance_factor=factor), cifar_root)
    assert len(data.train) == total


def test_cifar100_lt_subsets_are_nested_across_imbalance_factors(cifar_root):
    # one seeded shuffle per class, whatever is kept: IR 200 subset of IR 100 subset of IR 50
    small = load_dataset(BuiltinDataset(builtin="cifar100", imbalance_factor=0.005), cifar_root)
    large = load_dataset(BuiltinDataset(builtin="cifar100", imbalance_factor=0.01), cifar_root)
    assert torch.equal(small.train.images[:500], large.train.images[:500])


def test_missing_cifar_files_give_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="CIFAR python pickles"):
        load_cifar(tmp_path, "cifar10")


def test_cifar_needs_a_data_root():
    with pytest.raises(ValueError, match="data root"):
        load_dataset(BuiltinDataset(builtin="cifar10"))


def test_embedded_digits_are_long_tailed_with_a_balanced_test_split():
    data = digits_long_tailed(BuiltinDataset(builtin="digits", imbalance_factor=0.05))
    counts = data.train_counts()
    assert counts[0] == 144 and counts[-1] == 7 and counts == sorted(counts, reverse=True)
    assert data.test_counts() == [30] * 10
    assert data.train.images.shape[1:] == (3, 16, 16) and data.train.images.dtype == torch.uint8
    assert [g for g in class_groups(counts)].count("many") == 2
    # real digits: the test images are not all alike
    assert data.test.images.float().std() > 50


def _image_tree(root: Path) -> None:
    """root/{train,test}/{cat,dog}/*.png: 3 training and 2 test images per class, and a stray text file."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("test", 2)):
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{i}.png")
    (root / "train" / "cat" / "notes.txt").write_text("not an image")


def test_image_folder_reads_train_and_test_trees(tmp_path):
    _image_tree(tmp_path)
    data = load_image_folder(tmp_path, image_size=16)
    assert data.class_names == ("cat", "dog")
    assert data.train_counts() == [3, 3] and data.test_counts() == [2, 2]
    assert data.train.images.shape == (6, 3, 16, 16)
    # a folder spec is relative to the data root (h2t train's --data-root, the service's H2T_DATA_ROOT)
    assert load_dataset(FolderDataset(folder=tmp_path.name, image_size=16), tmp_path.parent).num_classes == 2


def test_an_uploaded_archive_is_read_from_the_artifact_store(tmp_path):
    store = ArtifactLayout(tmp_path / "artifacts")
    _image_tree(store.dataset("d1"))
    spec = DATASET_SPEC.validate_python({"archive": "datasets/d1", "image_size": 12})
    data = load_dataset(spec, artifacts=store)
    assert data.class_names == ("cat", "dog") and data.train_counts() == [3, 3]
    assert data.train.images.shape == (6, 3, 12, 12)
    with pytest.raises(ValueError, match="artifact store"):
        load_dataset(spec)
    with pytest.raises(FileNotFoundError):
        load_dataset(ArchiveDataset(archive="datasets/missing"), artifacts=store)


def test_image_folder_refuses_test_classes_unknown_to_train(tmp_path):
    for d in ("train/a", "train/b", "test/c"):
        (tmp_path / d).mkdir(parents=True)
    with pytest.raises(ValueError, match="missing from train"):
        load_image_folder(tmp_path)


def test_describe_builtin_gives_the_counts_the_loader_builds_without_loading_images(cifar_root):
    from models.contract.catalog import describe_builtin

    for spec, root in ((BuiltinDataset(builtin="digits", imbalance_factor=0.1, profile="step"), None),
                       (BuiltinDataset(builtin="cifar100", imbalance_factor=0.02), cifar_root)):
        summary = describe_builtin(spec, root)
        data = load_dataset(spec, root)
        assert list(summary.train_counts) == data.train_counts()
        assert list(summary.test_counts) == data.test_counts()
        assert summary.class_names == data.class_names and summary.image_size == data.image_size


def test_describe_builtin_reports_missing_cifar_files(tmp_path):
    from models.contract.catalog import describe_builtin

    with pytest.raises(FileNotFoundError, match="not under the data root"):
        describe_builtin(BuiltinDataset(builtin="cifar10"), tmp_path)


def _image_keys(images: torch.Tensor) -> list[bytes]:
    return [bytes(image.numpy().tobytes()) for image in images]


def test_the_unused_validation_split_of_cifar100_lt_never_overlaps_training_or_test(cifar_root):
    from collections import Counter

    from models.contract.config import ValidationConfig

    data = load_dataset(BuiltinDataset(builtin="cifar100", imbalance_factor=0.01), cifar_root,
                        validation=ValidationConfig(per_class=20))
    left = [500 - n for n in data.train_counts()]  # the head class uses all its 500 images: none left
    assert torch.bincount(data.val.labels, minlength=100).tolist() == [min(20, n) for n in left]
    assert "left out" in data.val_source and len(data.train) == 10_847  # training is untouched
    full_train, _, _ = load_cifar(cifar_root, "cifar100")
    copies = Counter(_image_keys(full_train.images))  # CIFAR holds a few exact duplicates of its own
    train, test = set(_image_keys(data.train.images)), set(_image_keys(data.test.images))
    for key in _image_keys(data.val.images):
        assert key not in train or copies[key] > 1
        assert key not in test or copies[key] > 0 and key in set(_image_keys(full_train.images))


def test_a_carved_validation_split_is_disjoint_from_training_and_keeps_the_groups():
    from models.contract.config import ValidationConfig
    from models.core.data import carve_validation

    spec = BuiltinDataset(builtin="digits", imbalance_factor=0.1)
    full = load_dataset(spec)
    numbered = full.train.images.clone()
    numbered[:, 0, 0, 0] = torch.arange(len(numbered)) % 256  # tell every image apart by its pixels
    numbered[:, 1, 0, 0] = torch.arange(len(numbered)) // 256
    from dataclasses import replace

    from models.core.data import ImageSet
    full = replace(full, train=ImageSet(numbered, full.train.labels))
    carved = carve_validation(full, 0.2, seed=0)
    train, val = set(_image_keys(carved.train.images)), set(_image_keys(carved.val.images))
    assert not train & val and len(train) + len(val) == len(full.train)
    per_class = torch.bincount(carved.val.labels, minlength=10).tolist()
    assert per_class == [max(1, round(0.2 * n)) for n in full.train_counts()]
    assert carved.counts_for_groups() == full.train_counts()  # groups of the full training counts
    via_config = load_dataset(spec, validation=ValidationConfig(source="carve", fraction=0.2))
    assert len(via_config.val) == len(carved.val) and "carved" in via_config.val_source


def test_a_validation_source_the_dataset_cannot_give_is_refused():
    from models.contract.config import ValidationConfig

    with pytest.raises(ValueError, match="only a dataset by reference"):
        load_dataset(BuiltinDataset(builtin="digits"), validation=ValidationConfig(source="dataset"))
