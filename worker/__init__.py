"""The Celery worker: a thin shell that trains runs through `models` and records them in the store."""
