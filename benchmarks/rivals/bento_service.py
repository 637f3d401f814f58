"""BentoML serving the same ONNX file: `bentoml serve bento_service:OnnxClassifier --port P` with
H2T_BENCH_MODEL set; one worker, BentoML's defaults otherwise. The image arrives as multipart field
`images`; BentoML hands it over already decoded by Pillow."""

from __future__ import annotations

import os

import bentoml
import numpy as np
from common import session, top_k
from PIL.Image import Image


@bentoml.service(workers=1)
class OnnxClassifier:
    def __init__(self) -> None:
        self.model = session(os.environ["H2T_BENCH_MODEL"])

    @bentoml.api
    def predict(self, images: Image) -> dict:
        image = np.asarray(images.convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / np.float32(255)
        return top_k(self.model.run(None, {"image": image[None]})[0][0])
