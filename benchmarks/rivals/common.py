"""What every server in the serving comparison does per image, written once so each does the same work:
decode the PNG to RGB, scale to [0, 1] NCHW float32 (the ONNX model normalises inside its graph), run
onnxruntime, answer the top-5 classes as JSON. Imported by each rival's own service file, in its own
environment: numpy, Pillow and onnxruntime only."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

TOP_K = 5


def decode(png: bytes) -> np.ndarray:
    """One encoded image -> float32 3 x H x W in [0, 1]."""
    with Image.open(io.BytesIO(png)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / np.float32(255)


def session(path: str):
    import onnxruntime

    return onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])


def top_k(probabilities: np.ndarray) -> dict:
    order = np.argsort(-probabilities, kind="stable")[:TOP_K]
    return {"top_k": [{"class_index": int(c), "probability": float(probabilities[c])} for c in order]}
