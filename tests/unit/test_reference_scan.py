"""The scan of datasets by reference (models/contract/reference.py) on real JPEGs in the three formats, the
path confinement of their specs, and loading a scanned dataset into memory (models/core/data.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from models.contract.config import DATASET_SPEC, LocalTrainConfig
from models.contract.reference import DatasetUnavailable, FileList, confine, scan_reference
from tests.reference_data import CORRUPT, ReferenceTree


def _counts_by_name(index, split: str) -> dict[str, int]:
    return dict(zip(index.class_names, index.counts(split), strict=True))


@pytest.mark.parametrize("form", ["folder_spec", "list_files_spec", "coco_spec"])
def test_each_format_scans_to_the_same_counts_and_reports_the_corrupt_file(reference_root, form):
    root, tree = reference_root
    index = scan_reference(DATASET_SPEC.validate_python(getattr(tree, form)), root)
    assert sorted(index.class_names) == sorted(tree.class_names)
    assert _counts_by_name(index, "train") == dict(zip(tree.class_names, tree.train_counts, strict=True))
    assert _counts_by_name(index, "test") == dict(zip(tree.class_names, tree.test_counts, strict=True))
    assert [u.path for u in index.unreadable] == [f"{tree.folder}/{CORRUPT}"] and index.unreadable[0].reason
    assert all(not path.startswith("/") and (root / path).is_file() for path, _ in index.splits["train"])
    if form != "coco_spec":  # the COCO test file plays iNaturalist's val2018.json: no third split
        assert index.counts("val") == [1] * len(tree.class_names)


def test_folder_and_list_labels_follow_the_names_coco_labels_follow_category_ids(reference_root):
    root, tree = reference_root
    folder = scan_reference(DATASET_SPEC.validate_python(tree.folder_spec), root)
    lists = scan_reference(DATASET_SPEC.validate_python(tree.list_files_spec), root)
    coco = scan_reference(DATASET_SPEC.validate_python(tree.coco_spec), root)
    assert folder.class_names == lists.class_names == tree.class_names
    assert folder.splits == lists.splits
    ids = {c["name"]: c["id"] for c in json.loads((root / tree.folder / "coco/train.json").read_text())["categories"]}
    assert list(coco.class_names) == sorted(ids, key=ids.get)


def test_list_files_without_class_names_name_classes_by_label(reference_root):
    root, tree = reference_root
    spec = {**tree.list_files_spec, "list_files": {**tree.list_files_spec["list_files"], "class_names": None}}
    index = scan_reference(DATASET_SPEC.validate_python(spec), root)
    assert index.class_names == tuple(str(label) for label in range(len(tree.class_names)))


@pytest.mark.parametrize("spec", [
    {"folder": "/etc"}, {"folder": "lt/../.."}, {"folder": "..\\lt"}, {"folder": "."},
    {"list_files": {"root": "/data", "train": "a.txt", "test": "b.txt"}},
    {"list_files": {"root": "lt", "train": "../../a.txt", "test": "b.txt"}},
    {"coco": {"root": "lt", "train": "/abs/train.json", "test": "b.json"}},
])
def test_absolute_and_parent_paths_are_refused_by_the_spec(spec):
    with pytest.raises(ValidationError):
        DATASET_SPEC.validate_python(spec)


@pytest.mark.parametrize("spec", [
    {"folder": "escape"},
    {"list_files": {"root": "escape", "train": "lists/train.txt", "test": "lists/test.txt"}},
    {"coco": {"root": "lt", "train": "../escape/coco/train.json", "test": "coco/test.json"}},
])
def test_symlinks_out_of_the_root_are_refused(reference_root, spec):
    root, _ = reference_root
    if "coco" in spec:  # '..' is refused by the spec itself; a link inside the dataset folder is not
        link = root / "lt" / "coco" / "out.json"
        link.unlink(missing_ok=True)
        link.symlink_to(root.parent / "outside" / "coco" / "train.json")
        spec = {"coco": {"root": "lt", "train": "coco/out.json", "test": "coco/test.json"}}
    parsed = DATASET_SPEC.validate_python(spec)
    with pytest.raises(DatasetUnavailable, match="leaves the data root"):
        confine(parsed, root)
    with pytest.raises(DatasetUnavailable, match="leaves the data root"):
        scan_reference(parsed, root)


def _small_set(reference_root, tmp_path: Path) -> tuple[Path, Path]:
    """A second data root holding `set/imgs/0.jpg` and `1.jpg` (copies of a real image), and that image."""
    root, tree = reference_root
    data = tmp_path / "data"
    (data / "set" / "imgs").mkdir(parents=True)
    source = root / tree.folder / "train" / "c0" / "000.jpg"
    for i in range(2):
        (data / "set" / "imgs" / f"{i}.jpg").write_bytes(source.read_bytes())
    return data, source


def test_a_listed_file_linking_out_of_the_root_is_left_out_as_unreadable(reference_root, tmp_path):
    data, source = _small_set(reference_root, tmp_path)
    (data / "set" / "imgs" / "out.jpg").symlink_to(source)  # a file of the other root: outside this one
    (data / "set" / "train.txt").write_text("imgs/0.jpg 0\nimgs/1.jpg 1\nimgs/out.jpg 1\n")
    (data / "set" / "test.txt").write_text("imgs/0.jpg 0\nimgs/1.jpg 1\n")
    spec = DATASET_SPEC.validate_python({"list_files": {"root": "set", "train": "train.txt", "test": "test.txt"}})
    index = scan_reference(spec, data)
    assert index.splits["train"] == [("set/imgs/0.jpg", 0), ("set/imgs/1.jpg", 1)]
    assert [(u.path, u.reason) for u in index.unreadable] == [("set/imgs/out.jpg", "resolves outside the data root")]


@pytest.mark.parametrize("form", ["list_files", "coco"])
def test_listed_names_that_are_absolute_or_climb_out_are_left_out_as_unreadable(reference_root, tmp_path, form):
    data, source = _small_set(reference_root, tmp_path)
    train = [("imgs/0.jpg", 0), ("imgs/1.jpg", 1), ("../escape.jpg", 1), ("/etc/passwd.jpg", 0)]
    test = [("imgs/0.jpg", 0), ("imgs/1.jpg", 1)]
    if form == "list_files":
        (data / "set" / "train.txt").write_text("".join(f"{n} {label}\n" for n, label in train))
        (data / "set" / "test.txt").write_text("".join(f"{n} {label}\n" for n, label in test))
        spec = {"list_files": {"root": "set", "train": "train.txt", "test": "test.txt"}}
    else:
        for split, pairs in (("train", train), ("test", test)):
            document = {"images": [{"id": i, "file_name": n} for i, (n, _) in enumerate(pairs)],
                        "annotations": [{"id": i, "image_id": i, "category_id": label}
                                        for i, (_, label) in enumerate(pairs)],
                        "categories": [{"id": 0, "name": "a"}, {"id": 1, "name": "b"}]}
            (data / "set" / f"{split}.json").write_text(json.dumps(document))
        spec = {"coco": {"root": "set", "train": "train.json", "test": "test.json"}}
    index = scan_reference(DATASET_SPEC.validate_python(spec), data)
    assert index.splits["train"] == [("set/imgs/0.jpg", 0), ("set/imgs/1.jpg", 1)]
    assert [(u.path, u.reason) for u in index.unreadable] == [
        ("set/../escape.jpg", "listed path leaves the dataset root"),
        ("set//etc/passwd.jpg", "listed path leaves the dataset root"),
    ]


@pytest.mark.parametrize("spec, message", [
    ({"folder": "missing"}, "needs missing/train"),
    ({"list_files": {"root": "lt", "train": "lists/none.txt", "test": "lists/test.txt"}}, "not found"),
    ({"list_files": {"root": "lt", "train": "coco/train.json", "test": "lists/test.txt"}}, "is not '<path>"),
    ({"coco": {"root": "lt", "train": "lists/train.txt", "test": "coco/test.json"}}, "no readable 'categories'"),
])
def test_a_dataset_that_cannot_be_read_says_why(reference_root, spec, message):
    root, _ = reference_root
    with pytest.raises(DatasetUnavailable, match=message):
        scan_reference(DATASET_SPEC.validate_python(spec), root)


def test_reference_datasets_default_to_224_pixels():
    assert DATASET_SPEC.validate_python({"folder": "pets"}).image_size == 224


def test_load_dataset_reads_a_scanned_dataset_into_memory(reference_root: tuple[Path, ReferenceTree]):
    from models.core.data import load_dataset

    root, tree = reference_root
    config = LocalTrainConfig.model_validate({"dataset": tree.coco_spec})
    dataset = load_dataset(config.dataset, root)
    assert dataset.train.images.shape == (sum(tree.train_counts), 3, 32, 32)
    assert dataset.test.images.shape[0] == sum(tree.test_counts)
    assert sorted(dataset.train_counts()) == sorted(tree.train_counts)
    with pytest.raises(ValueError, match="data root"):
        load_dataset(config.dataset, None)


def test_a_file_list_packs_pairs_and_reads_them_back_in_order():
    files = FileList([("a/ü.jpg", 3), ("b/x y.png", 0)])
    files.append("c/z.jpg", 7)
    assert len(files) == 3 and list(files) == [("a/ü.jpg", 3), ("b/x y.png", 0), ("c/z.jpg", 7)]
    assert files[-1] == ("c/z.jpg", 7) and files[::2] == [("a/ü.jpg", 3), ("c/z.jpg", 7)]
    assert files.labels().tolist() == [3, 0, 7] and files == [("a/ü.jpg", 3), ("b/x y.png", 0), ("c/z.jpg", 7)]
    with pytest.raises(IndexError):
        files[3]


def test_a_fifo_and_a_loop_of_links_are_left_out_and_a_name_that_is_not_utf8_is_kept(reference_root, tmp_path):
    import os
    import shutil

    from models.contract.config import FolderDataset

    root, tree = reference_root
    data = tmp_path / "root"
    shutil.copytree(root / tree.folder, data / "lt")
    c1 = data / "lt" / "train" / tree.class_names[1]
    odd = os.fsencode(c1) + b"/odd\xff.jpg"
    with open(odd, "wb") as f:
        f.write(next(c1.glob("*.jpg")).read_bytes())
    os.mkfifo(c1 / "pipe.jpg")  # opening it would block until a writer comes
    (c1 / "loop.jpg").symlink_to("loop.jpg")

    index = scan_reference(FolderDataset(folder="lt"), data)
    reasons = {u.path.rsplit("/", 1)[-1]: u.reason for u in index.unreadable}
    assert reasons["pipe.jpg"] == "not a regular file" and reasons["loop.jpg"] == "a loop of symbolic links"
    kept = [path for path, _ in index.splits["train"] if path.endswith(".jpg") and "odd" in path]
    assert len(kept) == 1 and os.fsencode(data / kept[0]) == odd  # the bytes of its name survive the index
