"""The bare baseline: FastAPI + onnxruntime, decode one PNG and run the session inline, nothing else (no key,
no metrics, no batching). `uvicorn bare_fastapi:app` with H2T_BENCH_MODEL set to the ONNX file."""

from __future__ import annotations

import os

from common import decode, session, top_k
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

app = FastAPI()
model = session(os.environ["H2T_BENCH_MODEL"])


@app.post("/predict")
async def predict(request: Request) -> JSONResponse:
    form = await request.form()
    image = decode(await form["images"].read())
    probabilities = model.run(None, {"image": image[None]})[0][0]
    return JSONResponse(top_k(probabilities))
