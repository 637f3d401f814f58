"""A small long-tailed dataset of real JPEGs in the three reference formats, written by the tests.

From the CIFAR-100 python files under SHARED_DATA (the scikit-learn digits where they are absent): a
handful of classes with long-tailed training counts, a few test and validation images per class, each
image upscaled to its own size and aspect ratio (64 to 320 px a side) and saved as JPEG, as an
ImageFolder tree; list files (ImageNet-LT format, with a class-names file) and COCO JSON
(iNaturalist 2018 format) name the same files. One corrupt JPEG in a training class is listed by all
three, to show that unreadable files are reported and left out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from models.contract.catalog import unpickle

TRAIN_COUNTS = (40, 25, 16, 10, 6, 4)
TEST_PER_CLASS = 3
VAL_PER_CLASS = 1
CORRUPT = "train/c0/corrupt.jpg"  # relative to the dataset folder
# COCO category ids are not contiguous (as iNaturalist's are not in every release): labels follow id order
COCO_IDS = (7, 3, 11, 5, 2, 13)


@dataclass(frozen=True)
class ReferenceTree:
    folder: str  # relative to the data root: the ImageFolder tree, and root of the list files and COCO JSON
    source: str  # "cifar100" or "digits"
    class_names: tuple[str, ...]
    train_counts: tuple[int, ...]  # readable images per class
    test_counts: tuple[int, ...]

    @property
    def folder_spec(self) -> dict:
        return {"folder": self.folder, "image_size": 32}

    @property
    def list_files_spec(self) -> dict:
        return {"list_files": {"root": self.folder, "train": "lists/train.txt", "test": "lists/test.txt",
                               "val": "lists/val.txt", "class_names": "lists/classes.txt"}, "image_size": 32}

    @property
    def coco_spec(self) -> dict:
        return {"coco": {"root": self.folder, "train": "coco/train.json", "test": "coco/test.json"}, "image_size": 32}


def _source_images(shared_data: Path, per_class: int) -> tuple[str, list[str], list[list[np.ndarray]]]:
    """(source, class names, per class `per_class` HxWx3 uint8 images)."""
    cifar = shared_data / "cifar-100-python"
    classes = len(TRAIN_COUNTS)
    if (cifar / "train").exists():
        batch = unpickle(cifar / "train")
        names = unpickle(cifar / "meta")["fine_label_names"]
        data = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        labels = np.asarray(batch["fine_labels"])
        picked = [data[np.where(labels == c)[0][:per_class]] for c in range(classes)]
        return "cifar100", [names[c] for c in range(classes)], [list(images) for images in picked]
    from sklearn.datasets import load_digits

    digits = load_digits()
    gray = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    picked = [gray[digits.target == c][:per_class] for c in range(classes)]
    return "digits", [f"digit{c}" for c in range(classes)], [[np.repeat(g[:, :, None], 3, 2) for g in p]
                                                            for p in picked]


def write_reference_tree(data_root: Path, shared_data: Path, folder: str = "lt") -> ReferenceTree:
    per_class = max(TRAIN_COUNTS) + TEST_PER_CLASS + VAL_PER_CLASS
    source, names, images = _source_images(shared_data, per_class)
    rng = np.random.RandomState(0)
    base = data_root / folder
    class_dirs = [f"c{label}" for label in range(len(names))]  # folder names sort in label order
    lists: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    coco: dict[str, dict] = {split: {"images": [], "annotations": [],
                                     "categories": [{"id": i, "name": n} for i, n in zip(COCO_IDS, class_dirs,
                                                                                          strict=True)]}
                             for split in ("train", "test")}
    for label, cls in enumerate(class_dirs):
        pool = iter(images[label])
        for split, count in (("train", TRAIN_COUNTS[label]), ("test", TEST_PER_CLASS), ("val", VAL_PER_CLASS)):
            for i in range(count):
                width, height = (int(v) for v in rng.randint(64, 321, size=2))
                relative = f"{split}/{cls}/{i:03d}.jpg"
                (base / split / cls).mkdir(parents=True, exist_ok=True)
                Image.fromarray(next(pool)).resize((width, height), Image.BICUBIC).save(base / relative, quality=90)
                lists[split].append(f"{relative} {label}")
                if split in coco:
                    image_id = len(coco[split]["images"]) + 1
                    coco[split]["images"].append({"id": image_id, "file_name": relative, "width": width,
                                                  "height": height})
                    coco[split]["annotations"].append({"id": image_id, "image_id": image_id,
                                                       "category_id": COCO_IDS[label]})
    (base / CORRUPT).write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG" + bytes(range(256)))
    lists["train"].append(f"{CORRUPT} 0")
    image_id = len(coco["train"]["images"]) + 1
    coco["train"]["images"].append({"id": image_id, "file_name": CORRUPT})
    coco["train"]["annotations"].append({"id": image_id, "image_id": image_id, "category_id": COCO_IDS[0]})

    (base / "lists").mkdir()
    for split, lines in lists.items():
        (base / "lists" / f"{split}.txt").write_text("\n".join(lines) + "\n")
    (base / "lists" / "classes.txt").write_text("\n".join(class_dirs) + "\n")
    (base / "coco").mkdir()
    for split, document in coco.items():
        (base / "coco" / f"{split}.json").write_text(json.dumps(document))
    return ReferenceTree(folder, source, tuple(class_dirs), TRAIN_COUNTS, (TEST_PER_CLASS,) * len(class_dirs))
