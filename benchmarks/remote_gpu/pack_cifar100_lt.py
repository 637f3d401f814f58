"""Pack just the CIFAR-100 images the LT protocol reads (about 61 MiB), to carry to a GPU host offline.

The LT subsets depend only on the labels (per class, a seeded shuffle of that class's indices), and so do
their `unused` validation splits (20 per class of the images each subset left out), so `unpack` rebuilds the
standard pickle layout with every label and with the pixels of the union of the IR 200/100/50 subsets,
their validation splits and the whole test set; other training pixels are zero and never read, which
`unpack` checks by recomputing the subsets.

  python benchmarks/remote_gpu/pack_cifar100_lt.py pack data .remote-gpu/cifar100_lt.xz
  python benchmarks/remote_gpu/pack_cifar100_lt.py unpack .remote-gpu/cifar100_lt.xz /tmp/data
"""

from __future__ import annotations

import io
import lzma
import pickle
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from models.contract.catalog import long_tailed_counts, long_tailed_indices, unused_validation_indices  # noqa: E402
from models.contract.config import UNUSED_VALIDATION_PER_CLASS  # noqa: E402

FACTORS = (0.005, 0.01, 0.02)


def _subset_union(labels: np.ndarray) -> np.ndarray:
    kept = [long_tailed_indices(labels, long_tailed_counts(500, 100, f, "exp"), 0) for f in FACTORS]
    held = [unused_validation_indices(labels, k, UNUSED_VALIDATION_PER_CLASS, 0) for k in kept]
    return np.unique(np.concatenate(kept + held))


def pack(data_root: Path, dest: Path) -> None:
    base = data_root / "cifar-100-python"
    train, test, meta = (pickle.loads((base / n).read_bytes(), encoding="latin1") for n in ("train", "test", "meta"))
    labels = np.asarray(train["fine_labels"], dtype=np.int64)
    keep = _subset_union(labels)
    buf = io.BytesIO()
    np.savez(buf, train_labels=labels, keep=keep, train_pixels=np.asarray(train["data"])[keep],
             test_labels=np.asarray(test["fine_labels"], dtype=np.int64), test_pixels=np.asarray(test["data"]),
             names=np.asarray(meta["fine_label_names"]))
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(lzma.compress(buf.getvalue(), preset=9))
    size = dest.stat().st_size / 2**20
    print(f"{len(keep)} train + {len(test['fine_labels'])} test images -> {dest} ({size:.1f} MiB)")


def unpack(src: Path, data_root: Path) -> None:
    z = np.load(io.BytesIO(lzma.decompress(src.read_bytes())))
    labels, keep = z["train_labels"], z["keep"]
    if not np.array_equal(_subset_union(labels), keep):
        raise SystemExit("the packed images are not the LT subsets of these labels")
    pixels = np.zeros((len(labels), 3072), dtype=np.uint8)
    pixels[keep] = z["train_pixels"]
    base = data_root / "cifar-100-python"
    base.mkdir(parents=True, exist_ok=True)
    files = {"train": {"data": pixels, "fine_labels": labels.tolist()},
             "test": {"data": z["test_pixels"], "fine_labels": z["test_labels"].tolist()},
             "meta": {"fine_label_names": z["names"].tolist()}}
    for name, obj in files.items():
        (base / name).write_bytes(pickle.dumps(obj, protocol=2))
    print(f"unpacked {len(keep)} train pixels of {len(labels)} labels and {len(z['test_labels'])} test images")


if __name__ == "__main__":
    verb, a, b = sys.argv[1:4]
    (pack if verb == "pack" else unpack)(Path(a), Path(b))
