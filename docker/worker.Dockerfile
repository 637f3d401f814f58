# The GPU worker image: CUDA PyTorch + torchvision + onnxruntime-gpu, one Celery process per container.
# The PyPI torch wheels carry the CUDA runtime; the host needs the NVIDIA driver and container toolkit.
FROM python:3.11.10-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility
RUN groupadd --system --gid 10001 h2t \
 && useradd --system --uid 10001 --gid h2t --create-home --home-dir /home/h2t h2t \
 && mkdir -p /data/artifacts /data/datasets && chown -R h2t:h2t /data

WORKDIR /app
RUN pip install "torch==2.14.1" "torchvision==0.29.1"
COPY pyproject.toml README.md ./
COPY models ./models
COPY service ./service
COPY worker ./worker
COPY h2t ./h2t
COPY migrations ./migrations
# `gpu` brings onnxruntime-gpu; the CPU onnxruntime must never be installed beside it
RUN pip install ".[train,gpu]" && ! pip show onnxruntime >/dev/null 2>&1

USER h2t
CMD ["h2t", "worker"]
