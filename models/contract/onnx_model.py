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
    return evaluate_predictions(probs, labels, groups)
