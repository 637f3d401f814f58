"""The one seam between the training loop and its images: a batch source.

A stage draws its epoch up front (`models.core.stages`): per step, one or two image requests, each the
indices of training images and their augmentation draws. The loop hands the whole epoch's requests to
its source and takes back each step's batches in order; only the source knows where pixels come from:

- `MemorySource`: the dataset decoded once and held on the training device; a batch is an index and a
  tensor op. For CIFAR-scale sets.
- `StreamingSource`: the image files read per batch by worker processes (decoded there with Pillow,
  or, on a CUDA device, read there and decoded on the GPU with nvJPEG), a few batches ahead of the
  step that needs them. Resident memory holds the file list and the batches in flight, not the images.

For the same draws the two give the same uint8 pixels where the images are the same (pad crops of
images resized to S x S), so a seed trains the same model through either. Evaluation always fits test
images with `read_rgb`, the function serving decodes requests with, so reported metrics are the served
model's.
"""

from __future__ import annotations

import ctypes
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from models.contract.config import LoaderConfig, RunConfig
from models.core.augment import (
    Augmentation,
    CropFlip,
    Draws,
    ResizedCropFlip,
    apply_extras,
    crop_flip,
    normalize,
    resized_crops,
)
from models.core.data import Dataset, FileSet, ImageSet
from models.core.device import to_model_layout

ImageRequest = tuple[torch.Tensor, Draws]  # indices into the training split (CPU), their augmentation draws
JPEG_SUFFIXES = (".jpg", ".jpeg")
PREFETCH_BATCHES = 4  # per worker: enough to hide a slow file, bounded so memory is too


@dataclass(frozen=True)
class Batch:
    images: torch.Tensor  # float32 N x 3 x S x S, normalised, on the device in the model's memory layout
    labels: torch.Tensor  # N, int64, on the device


def augmentation_for(config: RunConfig, image_size: int) -> Augmentation:
    return Augmentation(config.augment.crop_kind(image_size), image_size, config.augment.random_crop,
                        config.augment.horizontal_flip)


def loader_workers(loader: LoaderConfig, ranks: int = 1) -> int:
    """The decoding processes a loader config asks for (per rank of a data-parallel run); by default the CPUs
    this process may use, shared by the run's ranks, at most 16."""
    if loader.workers is not None:
        return loader.workers
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(16, max(1, cpus // ranks))


class BatchSource:
    """What the training loop asks of its data; `source_for` picks the implementation."""

    def __init__(self, dataset: Dataset, augmentation: Augmentation, device: torch.device) -> None:
        self.augmentation = augmentation
        self.device = device
        self.train_labels = dataset.train.labels  # on the CPU: the stages draw from them
        self.test_labels = dataset.test.labels
        self._labels = dataset.train.labels.to(device)
        self._mean = torch.tensor(dataset.mean, device=device)
        self._std = torch.tensor(dataset.std, device=device)

    def steps(self, requests: Sequence[Sequence[ImageRequest]]) -> Iterator[list[Batch]]:
        """Per step, in order, one batch per request."""
        raise NotImplementedError

    def test_images(self, batch_size: int) -> Iterator[torch.Tensor]:
        """The test split in order as uint8 N x 3 x S x S batches on the device."""
        raise NotImplementedError

    def _batch(self, images: torch.Tensor, indices: torch.Tensor, draws: Draws,
               out: torch.Tensor | None = None) -> Batch:
        """A step's cropped uint8 images with the rest of their augmentation (the draws' extras: a policy,
        Cutout) applied and normalised on the device (into `out` when given), with their labels."""
        augmented = apply_extras(images.to(self.device, non_blocking=True), draws)
        x = normalize(augmented, self._mean, self._std, out)
        return Batch(to_model_layout(x, self.device), self._labels[indices.to(self.device, non_blocking=True)])


class MemorySource(BatchSource):
    def __init__(self, dataset: Dataset, augmentation: Augmentation, device: torch.device) -> None:
        if not isinstance(dataset.train, ImageSet) or not isinstance(dataset.test, ImageSet):
            raise TypeError("MemorySource needs a dataset held in memory")
        super().__init__(dataset, augmentation, device)
        self._train = dataset.train.images.to(device)
        self._test = dataset.test.images.to(device)

    def steps(self, requests: Sequence[Sequence[ImageRequest]]) -> Iterator[list[Batch]]:
        # every index and draw of the epoch goes to the device before the first step, so no step waits on a copy
        moved = [[(idx.to(self.device), draws.to(self.device)) for idx, draws in step] for step in requests]
        for step in moved:
            yield [self._batch(self.augmentation.apply(self._train[idx], draws), idx, draws) for idx, draws in step]

    def test_images(self, batch_size: int) -> Iterator[torch.Tensor]:
        yield from self._test.split(batch_size)


def read_augmented(files: FileSet, indices: torch.Tensor, draws: Draws, augmentation: Augmentation,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """Decode and augment one request's images from their files, into `out` when given: uint8 N x 3 x S x S.

    Pad crops read each image as the in-memory path holds it (`read_rgb`, squashed to S x S) and crop the
    stack with the same tensor op, so the pixels are bit-identical. Resized crops decode only as much of a
    JPEG as the crop needs (libjpeg's DCT scaling through Pillow's `draft`) and resize the crop with torch's
    antialiased bilinear filter, which is vectorised for uint8 images."""
    size = augmentation.image_size
    if isinstance(draws, CropFlip):
        stack = torch.stack([torch.from_numpy(files.read(int(i))) for i in indices])
        cropped = crop_flip(stack, augmentation.padding, draws)
        return cropped if out is None else out.copy_(cropped)
    if out is None:
        out = torch.empty((len(indices), 3, size, size), dtype=torch.uint8)
    for k, i in enumerate(indices.tolist()):
        out[k] = _read_resized_crop(files, i, draws, k, size)
    return out


def _read_resized_crop(files: FileSet, i: int, draws: ResizedCropFlip, k: int, size: int) -> torch.Tensor:
    """One image's resized crop: uint8 3 x S x S."""
    from PIL import Image

    path = files.path(i)
    try:
        with Image.open(path) as image:
            width, height = image.size
            left, top, w, h = draws.crop_box(k, width, height)
            pixels = None
            if image.format == "JPEG" and min(w, h) < 2 * size:
                pixels = _decode_jpeg(path)  # libjpeg-turbo through torchvision: a little faster than Pillow
            if pixels is None:
                # a JPEG whose crop is at least twice S decodes at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling)
                image.draft("RGB", (math.ceil(width * size / w), math.ceil(height * size / h)))
                pixels = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ValueError(f"{files.name(i)} could not be decoded: {exc}") from exc
    sx, sy = pixels.shape[2] / width, pixels.shape[1] / height
    x0, y0 = int(left * sx), int(top * sy)
    x1, y1 = max(x0 + 1, round((left + w) * sx)), max(y0 + 1, round((top + h) * sy))
    crop = pixels[None, :, y0:y1, x0:x1]
    resized = torch.nn.functional.interpolate(crop, size=(size, size), mode="bilinear", antialias=True)[0]
    return resized.flip(-1) if bool(draws.flip[k]) else resized


def _decode_jpeg(path: Path) -> torch.Tensor | None:
    """uint8 3 x H x W, or None where torchvision's decoder refuses the file (Pillow then tries)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # see decode_on_device
        try:
            return decode_jpeg(torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8),
                               mode=ImageReadMode.RGB)
        except RuntimeError:
            return None


RELEASE_EVERY = 16  # steps between handing freed heap memory back to the system


def release_freed_memory() -> None:
    """Return the heap's freed pages to the system (glibc's malloc_trim). Batches of a few MB fall under
    glibc's mmap threshold once it has adapted, and freed heap memory is otherwise kept: resident memory
    would grow with the batches an epoch has seen instead of staying at the batches in flight."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to trim
        return None


_MALLOC_TRIM = _malloc_trim()


def read_bytes(files: FileSet, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoded files of a request, concatenated (one shared-memory tensor per batch, not one per image),
    and the offsets that split them."""
    blobs = [files.path(i).read_bytes() for i in indices.tolist()]
    offsets = torch.tensor([0, *np.cumsum([len(b) for b in blobs]).tolist()], dtype=torch.int64)
    return torch.frombuffer(bytearray(b"".join(blobs)), dtype=torch.uint8), offsets


def decode_on_device(data: torch.Tensor, offsets: torch.Tensor, draws: ResizedCropFlip, size: int,
                     device: torch.device, names: Sequence[str] = ()) -> torch.Tensor:
    """JPEGs decoded on `device` (nvJPEG on a GPU) in one batched call, then resized-cropped there. Where the
    batched call fails, each file is decoded on its own, by Pillow where the device's decoder refuses it (a
    PNG named .jpg, say); a file neither reads fails the run, naming it (`names`, in batch order)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    blobs = [data[a:b] for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True)]
    with warnings.catch_warnings():
        # torchvision deprecates its decoders in favour of TorchCodec; its nvJPEG path still works
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            images = decode_jpeg(blobs, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            images = [_decode_one(blob, device, names[k] if k < len(names) else f"image {k} of the batch")
                      for k, blob in enumerate(blobs)]
    return resized_crops(images, draws, size)


def _decode_one(blob: torch.Tensor, device: torch.device, name: str) -> torch.Tensor:
    import io

    from PIL import Image
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return decode_jpeg(blob, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        pass
    try:
        with Image.open(io.BytesIO(blob.numpy().tobytes())) as image:
            pixels = np.array(image.convert("RGB"))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ValueError(f"{name} could not be decoded: {exc}") from exc
    return torch.from_numpy(pixels).permute(2, 0, 1).to(device)


class _EpochImages(torch.utils.data.Dataset):
    """Item s is step s's requests read from their files (in a worker process); the epoch's requests are
    inherited by the forked workers, only step numbers and finished batches cross between processes.

    Batches come back encoded (for decoding on the GPU) or as uint8 pixels written straight into shared
    memory, so handing them over copies nothing and moves a quarter of the bytes of float pixels."""

    def __init__(self, files: FileSet, augmentation: Augmentation, requests: Sequence[Sequence[ImageRequest]],
                 encoded: bool) -> None:
        self.files, self.augmentation, self.requests, self.encoded = files, augmentation, requests, encoded
        self.served = 0

    def __len__(self) -> int:
        return len(self.requests)

    def __getitem__(self, step: int) -> list:
        if self.encoded:
            batches = [read_bytes(self.files, idx) for idx, _ in self.requests[step]]
        else:
            size = self.augmentation.image_size
            batches = [read_augmented(self.files, idx, draws, self.augmentation, out=_shared_uint8(len(idx), size))
                       for idx, draws in self.requests[step]]
        self.served += 1  # counted per worker process: each has its own copy of this object
        if self.served % RELEASE_EVERY == 1:
            release_freed_memory()  # the worker's decode buffers, as the trainer does with its batches
        return batches


def _shared_uint8(n: int, size: int) -> torch.Tensor | None:
    """An uninitialised uint8 N x 3 x S x S tensor in shared memory, in a worker process (else None)."""
    if torch.utils.data.get_worker_info() is None:
        return None
    storage = torch.empty(0, dtype=torch.uint8)._typed_storage()._new_shared(n * 3 * size * size)
    return torch.empty(0, dtype=torch.uint8).set_(storage, 0, (n, 3, size, size))


class _TestImages(torch.utils.data.Dataset):
    def __init__(self, files: FileSet, fit: str, batch_size: int) -> None:
        self.files, self.fit, self.batch_size = files, fit, batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.files) / self.batch_size)

    def __getitem__(self, k: int) -> torch.Tensor:
        end = min(len(self.files), (k + 1) * self.batch_size)
        return torch.stack([torch.from_numpy(self.files.read(i, self.fit)) for i in range(k * self.batch_size, end)])


def _loader(items: torch.utils.data.Dataset, workers: int, pin: bool) -> Iterator:
    """The items in order, read by `workers` processes a few items ahead. Whatever ends the iteration (the
    last item, an error, the consumer closing it) stops the worker processes at once, not when the garbage
    collector finds them; an error raised in a worker comes back as its own message, not a traceback."""
    # fork: workers share the parent's file list and draws instead of pickling them
    extra = {"prefetch_factor": PREFETCH_BATCHES, "multiprocessing_context": "fork"} if workers else {}
    iterator = iter(DataLoader(items, batch_size=None, shuffle=False, num_workers=workers, pin_memory=pin, **extra))
    try:
        yield from iterator
    except ValueError as exc:
        raise ValueError(_worker_message(str(exc))) from exc
    finally:
        shutdown = getattr(iterator, "_shutdown_workers", None)  # absent without worker processes
        if shutdown is not None:
            shutdown()


def _worker_message(message: str) -> str:
    """'Caught ValueError in DataLoader worker process 0. Original Traceback ... ValueError: <why>' -> '<why>'."""
    if not message.startswith("Caught "):
        return message
    last = [line for line in message.splitlines() if line.strip()][-1]
    return last.split(": ", 1)[1] if last.startswith("ValueError: ") else last


class StreamingSource(BatchSource):
    def __init__(self, dataset: Dataset, augmentation: Augmentation, device: torch.device,
                 loader: LoaderConfig, ranks: int = 1) -> None:
        if not isinstance(dataset.train, FileSet) or not isinstance(dataset.test, FileSet):
            raise TypeError("StreamingSource needs a dataset of files")
        super().__init__(dataset, augmentation, device)
        self.train, self.test, self.eval_fit = dataset.train, dataset.test, dataset.eval_fit
        self.workers = loader_workers(loader, ranks)
        # nvJPEG where it pays: resized crops of an all-JPEG training split on a CUDA device
        all_jpeg = all(path.lower().endswith(JPEG_SUFFIXES) for path, _ in dataset.train.files)
        wanted = device.type == "cuda" and loader.decode_on_device and augmentation.kind == "resized" and all_jpeg
        self.decode_device = device if wanted else None
        self._buffers: dict[tuple[int, int], torch.Tensor] = {}

    def steps(self, requests: Sequence[Sequence[ImageRequest]]) -> Iterator[list[Batch]]:
        encoded = self.decode_device is not None
        items = _EpochImages(self.train, self.augmentation, requests, encoded)
        release_freed_memory()  # the workers fork from a process holding no freed batches
        loader = _loader(items, self.workers, self.device.type == "cuda")
        for n, (step, parts) in enumerate(zip(requests, loader, strict=True)):
            if encoded:
                parts = [decode_on_device(data, offsets, draws, self.augmentation.image_size, self.decode_device,
                                          [self.train.name(i) for i in idx.tolist()])
                         for (data, offsets), (idx, draws) in zip(parts, step, strict=True)]
            yield [self._batch(images, idx, draws, self._reused_buffer(n, r, images))
                   for r, (images, (idx, draws)) in enumerate(zip(parts, step, strict=True))]
            if n % RELEASE_EVERY == RELEASE_EVERY - 1:
                release_freed_memory()

    def _reused_buffer(self, step: int, request: int, images: torch.Tensor) -> torch.Tensor | None:
        """On a CPU device, where a step's normalised batch is written: one of two buffers per request,
        alternating by step, so their pages are touched once per run instead of once per batch. A batch stays
        valid while its step trains and through the next step; the training loop never holds it longer."""
        if self.device.type != "cpu":
            return None  # the copy to the accelerator makes a fresh tensor anyway
        n, c, h, w = images.shape
        key = (step % 2, request)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.shape[0] < n or buffer.shape[1:] != (c, h, w):
            buffer = torch.empty((n, h, w, c)).permute(0, 3, 1, 2)  # channels-last: the CPU model's layout
            self._buffers[key] = buffer
        return buffer[:n]

    def test_images(self, batch_size: int) -> Iterator[torch.Tensor]:
        release_freed_memory()
        for images in held_out_batches(self.test, self.eval_fit, batch_size, self.workers, self.device.type == "cuda"):
            yield images.to(self.device, non_blocking=True)


def held_out_batches(split: ImageSet | FileSet, fit: str, batch_size: int, workers: int = 0,
                     pin: bool = False) -> Iterator[torch.Tensor]:
    """A test split in order as uint8 CPU batches: sliced from memory, or read from its files by `fit`."""
    if isinstance(split, ImageSet):
        yield from split.images.split(batch_size)
        return
    yield from _loader(_TestImages(split, fit, batch_size), workers, pin)


def source_for(dataset: Dataset, config: RunConfig, device: torch.device, ranks: int = 1) -> BatchSource:
    """The run's batch source; `ranks`: how many processes of a data-parallel run share the host's CPUs."""
    augmentation = augmentation_for(config, dataset.image_size)
    if isinstance(dataset.train, FileSet):
        return StreamingSource(dataset, augmentation, device, config.loader, ranks)
    return MemorySource(dataset, augmentation, device)
