"""TorchServe serving the same ONNX file with its own request batching: a custom handler module (archived
with the ONNX file and common.py by torch-model-archiver). Each request's body (or multipart field) is one
PNG; a batch of them is decoded and run through onnxruntime in one call."""

from __future__ import annotations

import os

import numpy as np
from common import decode, session, top_k

_model = None


def handle(data, context):
    global _model
    if _model is None:
        _model = session(os.path.join(context.system_properties.get("model_dir"), "model.onnx"))
    if data is None:
        return None
    images = []
    for request in data:
        payload = request.get("data") or request.get("body") or request.get("images")
        images.append(decode(bytes(payload)))
    probabilities = _model.run(None, {"image": np.stack(images)})[0]
    return [top_k(p) for p in probabilities]
