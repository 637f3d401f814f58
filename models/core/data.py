"""Datasets: held whole in memory as uint8 tensors (CIFAR-LT, ImageFolder trees, embedded digits, small
datasets by reference), or as the list of their files under the data root, read per batch by the
streaming path (`models.core.source`)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from models.contract.catalog import (
    CIFAR_LAYOUT,
    CIFAR_TRAIN_PER_CLASS,
    DIGITS_CLASS_NAMES,
    DIGITS_N_MAX,
    DIGITS_SIZE,
    DIGITS_TEST_PER_CLASS,
    IMAGE_SUFFIXES,
    cifar_available,
    cifar_folder,
    long_tailed_counts,
    long_tailed_indices,
    unpickle,
    unused_validation_indices,
)
from models.contract.config import (
    ArchiveDataset,
    AugmentConfig,
    BuiltinDataset,
    CocoDataset,
    DatasetConfig,
    FolderDataset,
    ListFilesDataset,
    LoaderConfig,
    ReferenceDataset,
    ValidationConfig,
)
from models.contract.layout import ArtifactLayout
from models.contract.onnx_model import Fit, read_rgb
from models.contract.reference import FileList, ScanIndex, UnreadableFile, scan_reference

# The official H2T code normalises both CIFARs with these statistics.
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)


@dataclass(frozen=True)
class ImageSet:
    images: torch.Tensor  # N x 3 x H x W, uint8
    labels: torch.Tensor  # N, int64

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4 or self.images.shape[1] != 3:
            raise ValueError(f"images must be N x 3 x H x W uint8, got {tuple(self.images.shape)} {self.images.dtype}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError("labels must have one entry per image")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def image_size(self) -> int:
        return self.images.shape[-1]


@dataclass(frozen=True)
class FileSet:
    """A split as its image files: paths relative to `root` with their labels, packed (`FileList`) so that
    worker processes forked from the trainer share them instead of copying a Python object per image."""

    root: Path
    files: FileList
    labels: torch.Tensor  # N, int64
    image_size: int

    @classmethod
    def from_list(cls, root: Path, files: FileList, image_size: int) -> FileSet:
        return cls(root, files, torch.from_numpy(files.labels()), image_size)

    def path(self, i: int) -> Path:
        return self.root / self.files.path(i)

    def name(self, i: int) -> str:
        return self.files.path(i)

    def read(self, i: int, fit: Fit = "squash") -> np.ndarray:
        """Image i as uint8 3 x S x S by `fit` (see `read_listed`)."""
        return read_listed(self.path(i), self.name(i), self.image_size, fit)

    def __len__(self) -> int:
        return len(self.files)


Split = ImageSet | FileSet


@dataclass(frozen=True)
class Dataset:
    name: str
    class_names: tuple[str, ...]
    train: Split
    test: Split
    mean: tuple[float, float, float]  # per-channel normalisation, 0..1 pixel scale
    std: tuple[float, float, float]
    eval_fit: Fit = "squash"  # how test images (and served requests) become S x S, see `read_rgb`
    unreadable: tuple[UnreadableFile, ...] = ()  # files a scan of a dataset by reference left out
    val: Split | None = None  # held out for calibration (`with_validation`); read as the test split is
    val_source: str = ""  # where the validation images come from, in words, for the report
    group_counts: tuple[int, ...] | None = None  # the training counts groups are defined on, where carving a
    # validation split changed them (so a class's group does not depend on whether a run holds one out)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_size(self) -> int:
        return self.train.image_size

    @property
    def streams(self) -> bool:
        return isinstance(self.train, FileSet)

    def train_counts(self) -> list[int]:
        return torch.bincount(self.train.labels, minlength=self.num_classes).tolist()

    def counts_for_groups(self) -> list[int]:
        return list(self.group_counts) if self.group_counts is not None else self.train_counts()

    def test_counts(self) -> list[int]:
        return torch.bincount(self.test.labels, minlength=self.num_classes).tolist()


def _download_cifar(root: Path, name: str) -> None:
    from torchvision.datasets import CIFAR10, CIFAR100

    (CIFAR10 if name == "cifar10" else CIFAR100)(str(root), train=True, download=True)


def load_cifar(root: str | Path, name: str, download: bool = False) -> tuple[ImageSet, ImageSet, tuple[str, ...]]:
    """Read the CIFAR python pickles under `root` (train, test, class names).

    Reads the pickle layout itself rather than through torchvision's class, whose md5 check refuses
    re-packed copies of the real data. With `download`, fetches the official archive when missing.
    """
    base = cifar_folder(root, name)
    _, train_files, test_file, meta_file, label_key, names_key = CIFAR_LAYOUT[name]
    if not cifar_available(root, name):
        if not download:
            raise FileNotFoundError(
                f"{name}: no complete {base}; put the CIFAR python pickles under {root} or allow download")
        _download_cifar(Path(root), name)

    def read(files: list[str]) -> ImageSet:
        batches = [unpickle(base / f) for f in files]
        data = np.concatenate([np.asarray(b["data"], dtype=np.uint8) for b in batches])
        labels = np.concatenate([np.asarray(b[label_key], dtype=np.int64) for b in batches])
        images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
        return ImageSet(images, torch.from_numpy(labels))

    class_names = tuple(unpickle(base / meta_file)[names_key])
    return read(train_files), read([test_file]), class_names


def cifar_long_tailed(root: str | Path, spec: BuiltinDataset, download: bool = False,
                      unused_per_class: int = 0) -> Dataset:
    """The long-tailed subset of CIFAR's training set; with `unused_per_class`, a validation split of that
    many images per class from those the subset left out."""
    train, test, class_names = load_cifar(root, spec.builtin, download=download)
    num_classes = len(class_names)
    counts = long_tailed_counts(CIFAR_TRAIN_PER_CLASS[spec.builtin], num_classes, spec.imbalance_factor, spec.profile)
    keep = long_tailed_indices(train.labels.numpy(), counts, spec.sampling_seed)
    kept = torch.from_numpy(keep)
    lt_train = ImageSet(train.images[kept].contiguous(), train.labels[kept].contiguous())
    dataset = Dataset(f"{spec.builtin}-lt", class_names, lt_train, test, CIFAR_MEAN, CIFAR_STD)
    if unused_per_class:
        chosen = torch.from_numpy(unused_validation_indices(train.labels.numpy(), keep, unused_per_class,
                                                            spec.sampling_seed))
        val = ImageSet(train.images[chosen].contiguous(), train.labels[chosen].contiguous())
        dataset = replace(dataset, val=val, val_source=UNUSED_NOTE)
    return dataset


UNUSED_NOTE = ("images of the balanced training set that the long-tailed subset left out: extra labelled data "
               "the long-tailed benchmark does not give")


def digits_long_tailed(spec: BuiltinDataset, unused_per_class: int = 0) -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    gray = torch.from_numpy((bunch.images * (255.0 / 16.0)).round().astype(np.uint8))
    gray = torch.nn.functional.interpolate(gray[:, None].float(), size=DIGITS_SIZE, mode="bilinear",
                                           align_corners=False).round().clamp(0, 255).to(torch.uint8)
    images = gray.expand(-1, 3, -1, -1).contiguous()
    labels = np.asarray(bunch.target, dtype=np.int64)

    rng = np.random.RandomState(spec.sampling_seed)
    test_idx, pool_idx = [], []
    for cls in range(len(DIGITS_CLASS_NAMES)):
        idx = np.where(labels == cls)[0]
        rng.shuffle(idx)
        test_idx.append(idx[:DIGITS_TEST_PER_CLASS])
        pool_idx.append(idx[DIGITS_TEST_PER_CLASS:])
    counts = long_tailed_counts(DIGITS_N_MAX, len(DIGITS_CLASS_NAMES), spec.imbalance_factor, spec.profile)
    train_idx = np.concatenate([pool[:n] for pool, n in zip(pool_idx, counts, strict=True)])
    test_idx_all = np.concatenate(test_idx)
    train = ImageSet(images[train_idx], torch.from_numpy(labels[train_idx]))
    test = ImageSet(images[test_idx_all], torch.from_numpy(labels[test_idx_all]))
    mean, std = channel_stats(train.images)
    dataset = Dataset("digits-lt", DIGITS_CLASS_NAMES, train, test, mean, std)
    if unused_per_class:
        val_idx = np.concatenate([pool[n:n + unused_per_class] for pool, n in zip(pool_idx, counts, strict=True)])
        val = ImageSet(images[val_idx], torch.from_numpy(labels[val_idx]))
        dataset = replace(dataset, val=val, val_source=UNUSED_NOTE)
    return dataset


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    x = images.float().div_(255.0)
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return tuple(mean.tolist()), tuple(std.tolist())  # type: ignore[return-value]


STATS_SAMPLE = 2000  # images a dataset by reference measures its normalisation on


def stats_sample(n: int, sample: int = STATS_SAMPLE) -> range:
    """Evenly spaced positions of up to `sample` of `n` images."""
    return range(0, n, max(1, n // sample))[:sample]


def accumulated_channel_stats(images: Iterable[np.ndarray]) -> tuple[tuple[float, float, float],
                                                                      tuple[float, float, float]]:
    """Per-channel mean and std (0..1 scale) of uint8 3 x H x W images, accumulated one image at a time in
    float64: memory does not grow with their number, and the same images give the same bits whether they
    come from memory or from files."""
    total, squares, pixels = np.zeros(3), np.zeros(3), 0
    for image in images:
        x = np.ascontiguousarray(image, dtype=np.float64).reshape(3, -1) / 255.0  # one summation order
        total += x.sum(axis=1)
        squares += (x * x).sum(axis=1)
        pixels += x.shape[1]
    mean = total / max(pixels, 1)
    variance = (squares - pixels * mean * mean) / max(pixels - 1, 1)
    return tuple(mean.tolist()), tuple(np.maximum(np.sqrt(np.maximum(variance, 0)), 1e-3).tolist())  # type: ignore[return-value]


def load_image_folder(root: str | Path, image_size: int = 32) -> Dataset:
    """Read `root/train/<class>/<image>` and `root/test/<class>/<image>`, resizing to a square.

    Class names are the train folder names in sorted order; test may not name a class train lacks.
    """
    root = Path(root)
    train_dir, test_dir = root / "train", root / "test"
    for d in (train_dir, test_dir):
        if not d.is_dir():
            raise FileNotFoundError(f"image folder dataset needs {d}")
    class_names = tuple(sorted(p.name for p in train_dir.iterdir() if p.is_dir()))
    if len(class_names) < 2:
        raise ValueError(f"{train_dir} must hold at least two class folders")
    unknown = sorted({p.name for p in test_dir.iterdir() if p.is_dir()} - set(class_names))
    if unknown:
        raise ValueError(f"test classes missing from train: {unknown}")

    def read(split: Path) -> ImageSet:
        images, labels = [], []
        for label, name in enumerate(class_names):
            folder = split / name
            if not folder.is_dir():
                continue
            for path in sorted(folder.iterdir()):
                if path.suffix.lower() in IMAGE_SUFFIXES:
                    images.append(torch.from_numpy(read_rgb(path, image_size).copy()))
                    labels.append(label)
        if not images:
            raise ValueError(f"no images under {split}")
        return ImageSet(torch.stack(images), torch.tensor(labels, dtype=torch.int64))

    train, test = read(train_dir), read(test_dir)
    mean, std = channel_stats(train.images)
    return Dataset(root.name, class_names, train, test, mean, std)


def load_indexed(index: ScanIndex, data_root: str | Path, image_size: int, name: str, eval_fit: Fit = "squash",
                 streaming: bool = False, with_val: bool = False) -> Dataset:
    """The train and test splits of a scan index: in memory, each training image resized to the square
    `image_size` (as `load_image_folder`) and each test image by `eval_fit`; or, `streaming`, as their file
    lists. Either way the normalisation is measured on the same evenly spaced sample of training images.
    A file that passed the scan's header check but does not decode fails here (or in the batch it is in)."""
    root = Path(data_root).resolve()

    def read(pairs: FileList, fit: Fit) -> ImageSet:
        images = torch.empty((len(pairs), 3, image_size, image_size), dtype=torch.uint8)
        for i, (path, _) in enumerate(pairs):
            images[i] = torch.from_numpy(read_listed(root / path, path, image_size, fit))
        return ImageSet(images, torch.tensor([label for _, label in pairs], dtype=torch.int64))

    train_pairs, test_pairs = index.splits["train"], index.splits["test"]
    val_pairs = index.splits.get("val") if with_val else None
    if with_val and val_pairs is None:
        raise ValueError(f"{name} has no val split to hold out; use validation source 'carve'")
    sample = stats_sample(len(train_pairs))
    if streaming:
        train = FileSet.from_list(root, train_pairs, image_size)
        mean, std = accumulated_channel_stats(train.read(i) for i in sample)
        test = FileSet.from_list(root, test_pairs, image_size)
        val = FileSet.from_list(root, val_pairs, image_size) if val_pairs is not None else None
    else:
        train = read(train_pairs, "squash")
        mean, std = accumulated_channel_stats(train.images[i].numpy() for i in sample)
        test = read(test_pairs, eval_fit)
        val = read(val_pairs, eval_fit) if val_pairs is not None else None
    return Dataset(name, index.class_names, train, test, mean, std, eval_fit, tuple(index.unreadable), val,
                   "the dataset's own val split" if val is not None else "")


def carve_validation(dataset: Dataset, fraction: float, seed: int) -> Dataset:
    """The dataset with a per-class `fraction` of its training images (at least one; none of a class with a
    single image) moved to a validation split; groups stay those of the full training counts."""
    labels = dataset.train.labels.numpy()
    rng = np.random.default_rng([seed, 2])
    held = []
    for c in range(dataset.num_classes):
        members = np.flatnonzero(labels == c)
        if len(members) >= 2:
            take = min(max(1, round(fraction * len(members))), len(members) - 1)
            held.append(rng.permutation(members)[:take])
    held_out = np.sort(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)
    kept = np.setdiff1d(np.arange(len(labels)), held_out)
    train, val = _subset(dataset.train, kept), _subset(dataset.train, held_out)
    return replace(dataset, train=train, val=val, group_counts=tuple(dataset.counts_for_groups()),
                   val_source=f"{fraction:.0%} of each class's training images, carved out of training")


def _subset(split: Split, positions: np.ndarray) -> Split:
    index = torch.from_numpy(positions)
    if isinstance(split, ImageSet):
        return ImageSet(split.images[index].contiguous(), split.labels[index].contiguous())
    files = FileList(split.files[int(i)] for i in positions)
    return FileSet(split.root, files, split.labels[index].contiguous(), split.image_size)


def read_listed(path: Path, shown: str, image_size: int, fit: Fit = "squash") -> np.ndarray:
    """`read_rgb` of a file a scan listed, as a writable contiguous array; a file that passed the scan's
    header check but does not decode fails the run here, naming it (`shown`: relative to the data root)."""
    try:
        return np.array(read_rgb(path, image_size, fit=fit))
    except (OSError, ValueError, SyntaxError) as exc:
        raise ValueError(f"{shown} could not be decoded: {exc}") from exc


def _reference_name(spec: ReferenceDataset) -> str:
    match spec:
        case FolderDataset():
            return Path(spec.folder).name
        case ListFilesDataset():
            return Path(spec.list_files.root).name
        case CocoDataset():
            return Path(spec.coco.root).name
    raise TypeError(f"not a dataset by reference: {type(spec).__name__}")


def load_dataset(
    spec: DatasetConfig, data_root: str | Path | None = None, artifacts: ArtifactLayout | None = None,
    download: bool = False, augment: AugmentConfig | None = None, loader: LoaderConfig | None = None,
    validation: ValidationConfig | None = None,
) -> Dataset:
    """Build the dataset a spec names: the one dispatch over the dataset union. CIFAR and datasets by
    reference need `data_root` (reference paths are relative to it and confined to it), an uploaded
    archive the artifact store it was extracted into; digits ship with scikit-learn.

    A dataset by reference is held in memory or streamed as `loader` decides from its size, and its test
    images are fitted as `augment`'s crop kind evaluates (squashed for pad crops, centre-cropped for
    resized crops).

    With `validation`, the dataset also holds a validation split as it says (`ValidationConfig.source`)."""
    augment, loader = augment or AugmentConfig(), loader or LoaderConfig()
    source = validation.source if validation is not None else None
    if source == "auto":
        source = "unused" if isinstance(spec, BuiltinDataset) else None  # decided below for the others
    if validation is not None:
        validation.check_for(spec)
    dataset = _load(spec, data_root, artifacts, download, augment, loader, validation, source)
    if validation is not None and dataset.val is None:  # carve, or auto without a val split of its own
        dataset = carve_validation(dataset, validation.fraction, getattr(spec, "sampling_seed", 0))
    return dataset


def _load(spec: DatasetConfig, data_root: str | Path | None, artifacts: ArtifactLayout | None, download: bool,
          augment: AugmentConfig, loader: LoaderConfig, validation: ValidationConfig | None,
          source: str | None) -> Dataset:
    unused = validation.per_class if source == "unused" else 0
    loader.streams(0, 1, isinstance(spec, ReferenceDataset))  # refuses streaming what has no files
    match spec:
        case FolderDataset() | ListFilesDataset() | CocoDataset():
            if data_root is None:
                raise ValueError("a dataset by reference needs the data root its paths are relative to")
            # scanned again: the tree may have changed since the dataset was registered
            index = scan_reference(spec, data_root)
            images = len(index.splits["train"]) + len(index.splits["test"])
            fit: Fit = "squash" if augment.crop_kind(spec.image_size) == "pad" else "center_crop"
            with_val = source == "dataset" or (validation is not None and validation.source == "auto"
                                               and "val" in index.splits)
            return load_indexed(index, data_root, spec.image_size, _reference_name(spec), fit,
                                loader.streams(images, spec.image_size, by_reference=True), with_val)
        case ArchiveDataset():
            if artifacts is None:
                raise ValueError(f"archive dataset {spec.archive!r} needs the artifact store it was extracted into")
            return load_image_folder(artifacts.resolve(spec.archive), spec.image_size)
        case BuiltinDataset(builtin="digits"):
            return digits_long_tailed(spec, unused)
        case BuiltinDataset():
            if data_root is None:
                raise ValueError(f"{spec.builtin} needs a data root holding the CIFAR python files")
            return cifar_long_tailed(data_root, spec, download=download, unused_per_class=unused)
    raise TypeError(f"not a dataset spec: {type(spec).__name__}")
