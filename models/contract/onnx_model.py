"""Running an exported classifier with onnxruntime: numpy and Pillow only, no torch.

The contract of every exported model: input `image`, float32 N x 3 x H x W, RGB scaled to [0, 1]
(normalisation happens inside the graph); output `probabilities`, N x C softmax. Its metadata
holds the image size, the normalisation, the class names and their many/medium/few groups.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from models.contract.metrics import EvaluationReport, evaluate_predictions

INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"


# How an image becomes the model's square input at evaluation and in serving:
# "squash" resizes the whole image to S x S (CIFAR-scale training, pad crops);
# "center_crop" resizes the short side to S / 0.875 (256 for 224), aspect kept, and takes the centred S x S.
Fit = Literal["squash", "center_crop"]
CENTER_CROP_RATIO = 0.875


@dataclass(frozen=True)
class ModelSpec:
    """What a client must know to use the model; stored in the ONNX metadata as JSON."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    class_names: tuple[str, ...]
    groups: tuple[str, ...]
    fit: Fit = "squash"

    def input_description(self) -> dict:
        """The preprocessing contract a client follows; also served as the model's `input`."""
        return {"name": INPUT_NAME, "layout": "NCHW", "channels": "RGB", "dtype": "float32",
                "range": [0.0, 1.0], "height": self.image_size, "width": self.image_size,
                "resize": "bilinear", "fit": self.fit, "normalisation": "inside the graph",
                "mean": list(self.mean), "std": list(self.std)}

    def to_metadata(self) -> dict[str, str]:
        return {
            "h2t.input": json.dumps(self.input_description()),
            "h2t.output": json.dumps({"name": OUTPUT_NAME, "kind": "softmax probabilities"}),
            "h2t.class_names": json.dumps(list(self.class_names)),
            "h2t.groups": json.dumps(list(self.groups)),
        }

    @classmethod
    def from_metadata(cls, metadata: dict[str, str]) -> ModelSpec:
        spec = json.loads(metadata["h2t.input"])
        return cls(spec["height"], tuple(spec["mean"]), tuple(spec["std"]),
                   tuple(json.loads(metadata["h2t.class_names"])), tuple(json.loads(metadata["h2t.groups"])),
                   spec.get("fit", "squash"))  # models exported before `fit` existed squash


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def providers() -> list[str]:
    """CUDA when onnxruntime-gpu sees a GPU, else the CPU."""
    import onnxruntime

    available = onnxruntime.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def load_session(path: str | Path, intra_op_threads: int = 0):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    return onnxruntime.InferenceSession(str(path), sess_options=options, providers=providers())


def on_cuda(session) -> bool:
    return session.get_providers()[0] == "CUDAExecutionProvider"


def _cuda_runtime():
    """The CUDA runtime library onnxruntime-gpu runs on, through ctypes; None where there is none."""
    import ctypes
    import ctypes.util

    names = [ctypes.util.find_library("cudart"), "libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0"]
    for name in filter(None, names):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


def pin_host_memory(array: np.ndarray) -> bool:
    """Page-lock a numpy buffer in place (cudaHostRegister), so copies from it to the GPU run by DMA at full
    speed rather than through the driver's staging copies; False where no CUDA runtime can do it."""
    runtime = _cuda_runtime()
    if runtime is None:
        return False
    import ctypes

    status = runtime.cudaHostRegister(ctypes.c_void_p(array.ctypes.data), ctypes.c_size_t(array.nbytes),
                                      ctypes.c_uint(0))
    return status == 0


def _unpin_host_memory(address: int) -> None:
    import ctypes

    runtime = _cuda_runtime()
    if runtime is not None:
        runtime.cudaHostUnregister(ctypes.c_void_p(address))


class BoundRunner:
    """Runs a session on whole batches through IO binding: the input is copied into a reused host buffer
    (page-locked where CUDA can lock it) and bound from there, the output is bound on the session's device
    and copied back once. On a CUDA session this spares the allocations and pageable copies of a plain
    `run`; on the CPU it gives the same probabilities (which is how it is tested without a GPU).

    One batch at a time (a lock): the buffer is shared; a GPU runs one batch at a time anyway.
    """

    def __init__(self, session, image_size: int, max_images: int, device: str | None = None) -> None:
        import threading
        import weakref

        self.session = session
        self.device = device or ("cuda" if on_cuda(session) else "cpu")
        self.max_images = max_images
        self.host = np.empty((max_images, 3, image_size, image_size), dtype=np.float32)
        self.pinned = self.device == "cuda" and pin_host_memory(self.host)
        if self.pinned:  # unlocked before the buffer is freed with the runner
            weakref.finalize(self, _unpin_host_memory, self.host.ctypes.data)
        self._lock = threading.Lock()

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """float32 N x 3 x S x S in [0, 1] -> N x C probabilities, in chunks of at most max_images."""
        return np.concatenate([self._run(images[i:i + self.max_images])
                               for i in range(0, len(images), self.max_images)])

    def _run(self, chunk: np.ndarray) -> np.ndarray:
        with self._lock:
            staged = self.host[:len(chunk)]
            np.copyto(staged, chunk)
            binding = self.session.io_binding()
            binding.bind_cpu_input(INPUT_NAME, staged)
            binding.bind_output(OUTPUT_NAME, self.device)
            self.session.run_with_iobinding(binding)
            return binding.copy_outputs_to_cpu()[0]


def session_spec(session) -> ModelSpec:
    return ModelSpec.from_metadata(session.get_modelmeta().custom_metadata_map)


def run_probabilities(session, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """images: float32 N x 3 x H x W in [0, 1] -> N x C probabilities."""
    outputs = [session.run([OUTPUT_NAME], {INPUT_NAME: images[i:i + batch_size]})[0]
               for i in range(0, len(images), batch_size)]
    return np.concatenate(outputs) if outputs else np.zeros((0, 0), dtype=np.float32)


def uint8_to_input(images: np.ndarray) -> np.ndarray:
    """uint8 N x 3 x H x W -> the model's float32 input."""
    return images.astype(np.float32) / np.float32(255.0)


def center_crop_short_side(image_size: int) -> int:
    return round(image_size / CENTER_CROP_RATIO)


def fit_box(width: int, height: int, image_size: int, fit: Fit) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """(size to resize the whole image to, box of the resized image to keep) for a `fit` of a width x height
    image: the one definition of evaluation geometry, used by training, export checks and serving."""
    if fit == "squash":
        return (image_size, image_size), (0, 0, image_size, image_size)
    short = center_crop_short_side(image_size)
    scale = short / min(width, height)
    size = (max(short, round(width * scale)), max(short, round(height * scale)))
    left, top = (size[0] - image_size) // 2, (size[1] - image_size) // 2
    return size, (left, top, left + image_size, top + image_size)


def read_rgb(source: bytes | Path, image_size: int, max_pixels: int | None = None, fit: Fit = "squash") -> np.ndarray:
    """An image file (bytes or a path) -> uint8 3 x S x S RGB by `fit` with bilinear filtering: how training
    reads images for evaluation and how serving decodes requests, so the two agree.

    Raises ValueError for anything Pillow cannot fully decode or larger than max_pixels.
    """
    from PIL import Image

    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            width, height = image.size
            if max_pixels is not None and width * height > max_pixels:
                raise ValueError(f"{width}x{height} is over the {max_pixels}-pixel limit")
            size, box = fit_box(width, height, image_size, fit)
            rgb = image.convert("RGB").resize(size, Image.BILINEAR)
            if fit != "squash":
                rgb = rgb.crop(box)
            return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)
    except ValueError:
        raise
    except (OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ValueError(f"not a readable image ({image_error(exc)})") from exc


def image_error(exc: Exception) -> str:
    """Why Pillow could not read an image, as a user reads it: without the `<_io.BytesIO object at 0x...>`
    Pillow names an in-memory file by."""
    from PIL import UnidentifiedImageError

    if isinstance(exc, UnidentifiedImageError):
        return "an unknown format; PNG, JPEG, BMP, GIF, TIFF and WebP are read"
    return re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(exc)).strip() or type(exc).__name__


def decode_image(data: bytes, image_size: int, max_pixels: int, fit: Fit = "squash") -> np.ndarray:
    """Encoded image bytes -> the model's float32 3 x S x S input in [0, 1] (see `read_rgb`)."""
    return uint8_to_input(read_rgb(data, image_size, max_pixels, fit))


def evaluate_onnx(session, images_uint8: np.ndarray, labels: np.ndarray, groups: list[str]) -> EvaluationReport:
    """Accuracy and calibration, overall and per group, of the served artifact on a labelled split."""
    probs = run_probabilities(session, uint8_to_input(images_uint8))
    return evaluate_predictions(probs, labels, groups, classwise=True)
