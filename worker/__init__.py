"""The Celery worker: a thin shell that trains runs through `models.core` and records them through `service.store`."""
