"""The index of a dataset named by reference under the data root (ImageFolder, list files, COCO JSON),
read without decoding pixels: per split the (path, label) pairs, the class names, and the files left out.

Torch-free: the worker scans with it when a dataset is registered, and the training core loads from the
same index (into memory, or as the file list the streaming path reads). The pairs are packed (`FileList`:
one byte buffer of paths, their offsets and labels, no Python object per image), so an index of 10^6
files takes tens of MB, not hundreds.

What "readable" means here: Pillow opens the file and parses its header (format, width, height). The
pixels are not decoded, so scanning 10^5 to 10^6 files costs a header read each, not a full decode; a
file whose header is fine but whose data is truncated fails later, when training decodes it, naming
the file.
"""

from __future__ import annotations

import json
import os
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import overload

import numpy as np

from models.contract.catalog import IMAGE_SUFFIXES
from models.contract.config import CocoDataset, FolderDataset, ListFilesDataset, ReferenceDataset
from models.contract.pretrained import resolve_in_root as resolve_path_in_root

SPLITS = ("train", "val", "test")


class DatasetUnavailable(ValueError):
    """The reference cannot be read: a path that leaves the data root, a missing file, a malformed list."""


@dataclass(frozen=True)
class UnreadableFile:
    path: str  # relative to the data root
    reason: str


class FileList(Sequence[tuple[str, int]]):
    """(path, label) pairs packed into one UTF-8 byte buffer, the offsets that end each path, and the labels:
    about len(path) + 16 bytes an image. Worker processes forked from a trainer share it as three objects
    instead of touching (and so copying) a Python object per image."""

    def __init__(self, pairs: Iterable[tuple[str, int]] = ()) -> None:
        self._blob = bytearray()
        self._ends = array("q")
        self._labels = array("q")
        for path, label in pairs:
            self.append(path, label)

    def append(self, path: str, label: int) -> None:
        self._blob += path.encode(errors="surrogateescape")  # a file name that is not UTF-8 round-trips as-is
        self._ends.append(len(self._blob))
        self._labels.append(label)

    def __len__(self) -> int:
        return len(self._ends)

    def path(self, i: int) -> str:
        start = self._ends[i - 1] if i > 0 else 0
        return self._blob[start:self._ends[i]].decode(errors="surrogateescape")

    @overload
    def __getitem__(self, i: int) -> tuple[str, int]: ...

    @overload
    def __getitem__(self, i: slice) -> list[tuple[str, int]]: ...

    def __getitem__(self, i: int | slice) -> tuple[str, int] | list[tuple[str, int]]:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.path(i), self._labels[i]

    def __iter__(self) -> Iterator[tuple[str, int]]:
        return (self[i] for i in range(len(self)))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    def labels(self) -> np.ndarray:
        return np.frombuffer(self._labels, dtype=np.int64).copy()


@dataclass(frozen=True)
class ScanIndex:
    """What a scan found. Paths are relative to the data root; labels index `class_names`."""

    class_names: tuple[str, ...]
    splits: dict[str, FileList]  # train, test, and val where the dataset has one
    unreadable: list[UnreadableFile] = field(default_factory=list)

    def counts(self, split: str) -> list[int]:
        if split not in self.splits:
            return [0] * len(self.class_names)
        return np.bincount(self.splits[split].labels(), minlength=len(self.class_names)).tolist()


def resolve_in_root(data_root: str | Path, relative: str) -> Path:
    """`relative` under the data root, with symlinks followed; refused when the result leaves the root."""
    try:
        return resolve_path_in_root(Path(data_root), relative)
    except ValueError as exc:
        raise DatasetUnavailable(str(exc)) from exc


def _readable(root: Path, path: Path) -> str | None:
    """Why the file cannot be used, or None: it must stay in the root and Pillow must parse its header."""
    from PIL import Image, UnidentifiedImageError

    try:
        resolved = path.resolve()
        if not resolved.is_relative_to(root):
            return "resolves outside the data root"
        if not resolved.is_file():  # a FIFO or device would block or never end when opened
            return "not a regular file"
        with Image.open(path) as image:
            width, height = image.size
        if width < 1 or height < 1:
            return f"has no pixels ({width}x{height})"
    except UnidentifiedImageError:
        return "not an image Pillow can open"
    except OSError as exc:  # the message, without the server's absolute path
        return f"{type(exc).__name__}: {exc.strerror or exc}"
    except RuntimeError:  # Path.resolve on a loop of symbolic links
        return "a loop of symbolic links"
    except (ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _checked(root: Path, entries: Iterable[tuple[Path, int]], unreadable: list[UnreadableFile]) -> FileList:
    kept = FileList()
    for path, label in entries:
        relative = os.path.relpath(path, root)
        reason = _readable(root, path)
        if reason is None:
            kept.append(relative, label)
        else:
            unreadable.append(UnreadableFile(relative, reason))
    return kept


def _scan_folder(root: Path, spec: FolderDataset) -> ScanIndex:
    base = resolve_in_root(root, spec.folder)
    split_dirs = {split: base / split for split in SPLITS}
    for split in ("train", "test"):
        if not split_dirs[split].is_dir():
            raise DatasetUnavailable(f"an image folder dataset needs {spec.folder}/{split}/<class>/")
    class_names = tuple(sorted(p.name for p in split_dirs["train"].iterdir() if p.is_dir()))
    index: dict[str, int] = {name: label for label, name in enumerate(class_names)}
    unreadable: list[UnreadableFile] = []
    splits = {}
    for split, folder in split_dirs.items():
        if not folder.is_dir():
            continue
        classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
        unknown = [c for c in classes if c not in index]
        if unknown:
            raise DatasetUnavailable(f"{spec.folder}/{split} has classes train lacks: {unknown[:10]}")
        entries = ((path, index[name]) for name in classes for path in sorted((folder / name).iterdir())
                   if path.suffix.lower() in IMAGE_SUFFIXES)
        splits[split] = _checked(root, entries, unreadable)
    return ScanIndex(class_names, splits, unreadable)


def _read_list(path: Path, shown: str) -> FileList:
    pairs = FileList()
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            name, _, label = line.strip().rpartition(" ")
            try:
                value = int(label)
            except ValueError:
                raise DatasetUnavailable(f"{shown}:{number} is not '<path> <integer label>'") from None
            if not name.strip() or value < 0:
                raise DatasetUnavailable(f"{shown}:{number} is not '<path> <non-negative integer label>'")
            pairs.append(name.strip(), value)
    return pairs


def _scan_list_files(root: Path, spec: ListFilesDataset) -> ScanIndex:
    files = spec.list_files
    base = resolve_in_root(root, files.root)
    named = {split: getattr(files, split) for split in SPLITS if getattr(files, split) is not None}
    lists = {}
    for split, name in named.items():
        path = resolve_in_root(base, name)
        if not path.is_file():
            raise DatasetUnavailable(f"list file {files.root}/{name} not found")
        lists[split] = _read_list(path, f"{files.root}/{name}")
    num_classes = 1 + max((int(pairs.labels().max()) for pairs in lists.values() if len(pairs)), default=-1)
    if files.class_names is not None:
        path = resolve_in_root(base, files.class_names)
        if not path.is_file():
            raise DatasetUnavailable(f"class names file {files.root}/{files.class_names} not found")
        class_names = tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
        if len(class_names) < num_classes:
            raise DatasetUnavailable(f"{files.class_names} names {len(class_names)} classes, the lists use "
                                     f"labels up to {num_classes - 1}")
    else:
        class_names = tuple(str(label) for label in range(num_classes))
    unreadable: list[UnreadableFile] = []
    splits = {}
    for split, pairs in lists.items():
        splits[split] = _checked(root, _listed_entries(files.root, base, pairs, unreadable), unreadable)
    return ScanIndex(class_names, splits, unreadable)


def _listed_entries(shown_root: str, base: Path, pairs: Iterable[tuple[str, int]],
                    unreadable: list[UnreadableFile]) -> Iterator[tuple[Path, int]]:
    """The (file, label) pairs a list or annotation file names under `base`, one at a time; a name that is
    absolute or climbs out with `..` is reported unreadable instead."""
    for name, label in pairs:
        if name.startswith("/") or ".." in Path(name).parts:
            unreadable.append(UnreadableFile(f"{shown_root}/{name}", "listed path leaves the dataset root"))
        else:
            yield base / name, label


def _coco_pairs(path: Path, shown: str, label_of: dict[int, int]) -> FileList:
    """(file_name, label) per image, in the file's image order; an image's first annotation gives its label.
    Images without an annotation are left out (a test file without labels has no use here)."""
    try:
        document = json.loads(path.read_bytes())
        category_of: dict[int, int] = {}
        for annotation in document["annotations"]:
            category_of.setdefault(annotation["image_id"], annotation["category_id"])
        pairs = FileList()
        for image in document["images"]:
            category = category_of.get(image["id"])
            if category is None:
                continue
            if category not in label_of:
                raise DatasetUnavailable(f"{shown}: category {category} is not among the train file's categories")
            pairs.append(str(image["file_name"]), label_of[category])
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise DatasetUnavailable(f"{shown} is not COCO-style JSON (images, annotations, categories): {exc}") from exc
    return pairs


def _scan_coco(root: Path, spec: CocoDataset) -> ScanIndex:
    files = spec.coco
    base = resolve_in_root(root, files.root)
    paths = {split: resolve_in_root(base, getattr(files, split)) for split in ("train", "test")}
    for split, path in paths.items():
        if not path.is_file():
            raise DatasetUnavailable(f"annotation file {files.root}/{getattr(files, split)} not found")
    try:
        categories = sorted(json.loads(paths["train"].read_bytes())["categories"], key=lambda c: c["id"])
        label_of = {category["id"]: label for label, category in enumerate(categories)}
        class_names = tuple(str(category.get("name", category["id"])) for category in categories)
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise DatasetUnavailable(f"{files.root}/{files.train} has no readable 'categories': {exc}") from exc
    unreadable: list[UnreadableFile] = []
    splits = {}
    for split, path in paths.items():
        pairs = _coco_pairs(path, f"{files.root}/{getattr(files, split)}", label_of)
        splits[split] = _checked(root, _listed_entries(files.root, base, pairs, unreadable), unreadable)
    return ScanIndex(class_names, splits, unreadable)


def scan_reference(spec: ReferenceDataset, data_root: str | Path) -> ScanIndex:
    """Read the index of `spec` under `data_root`, opening every image's header. Raises DatasetUnavailable
    when the dataset cannot be used at all (unreadable images are only reported, and left out)."""
    root = Path(data_root).resolve()
    match spec:
        case FolderDataset():
            index = _scan_folder(root, spec)
        case ListFilesDataset():
            index = _scan_list_files(root, spec)
        case CocoDataset():
            index = _scan_coco(root, spec)
        case _:
            raise TypeError(f"not a dataset by reference: {type(spec).__name__}")
    if len(index.class_names) < 2:
        raise DatasetUnavailable("a dataset needs at least two classes")
    for split in ("train", "test"):
        if not index.splits.get(split):
            raise DatasetUnavailable(f"no readable images in the {split} split")
    return index


def spec_paths(spec: ReferenceDataset) -> list[str]:
    """Every path a spec names, relative to the data root."""
    match spec:
        case FolderDataset():
            return [spec.folder]
        case ListFilesDataset():
            files = spec.list_files
            named = [files.train, files.test, files.val, files.class_names]
            return [files.root, *(f"{files.root}/{name}" for name in named if name is not None)]
        case CocoDataset():
            return [spec.coco.root, f"{spec.coco.root}/{spec.coco.train}", f"{spec.coco.root}/{spec.coco.test}"]
    raise TypeError(f"not a dataset by reference: {type(spec).__name__}")


def confine(spec: ReferenceDataset, data_root: str | Path) -> None:
    """Raises DatasetUnavailable when a path of the spec resolves (symlinks followed) outside the data root.
    Paths that do not exist yet pass: the scan reports them."""
    for path in spec_paths(spec):
        resolve_in_root(data_root, path)
