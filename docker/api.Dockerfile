# The API image: FastAPI + onnxruntime (CPU), no torch. Also runs the one-shot `h2t migrate`.
FROM python:3.11.10-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN groupadd --system --gid 10001 h2t \
 && useradd --system --uid 10001 --gid h2t --create-home --home-dir /home/h2t h2t \
 && mkdir -p /data/artifacts /data/datasets && chown -R h2t:h2t /data

WORKDIR /app
COPY pyproject.toml README.md ./
COPY models ./models
COPY service ./service
COPY worker ./worker
COPY h2t ./h2t
COPY migrations ./migrations
# packages only: no data, weights or secrets are fetched or baked in at build time
RUN pip install ".[cpu]" && python -c "import service.api.app, sys; assert 'torch' not in sys.modules"

USER h2t
EXPOSE 8000
CMD ["h2t", "serve", "--host", "0.0.0.0", "--port", "8000"]
