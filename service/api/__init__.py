"""The HTTP API (FastAPI): datasets, runs, models and predict; serves with onnxruntime, never imports torch."""
