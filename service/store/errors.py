"""Domain errors raised by the store and the API's use cases; the API turns them into RFC 9457
problem+json in one handler (service.api.errors). Each carries the HTTP status it maps to."""

from __future__ import annotations


class AppError(Exception):
    status = 400
    title = "Bad request"

    def __init__(self, detail: str, **extra: object) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra


class ResourceNotFound(AppError):
    status, title = 404, "Not found"


class ResourceConflict(AppError):
    status, title = 409, "Conflict"


class InvalidInput(AppError):
    status, title = 422, "Unprocessable content"


class PayloadTooLarge(AppError):
    status, title = 413, "Content too large"


class UnsupportedMediaType(AppError):
    status, title = 415, "Unsupported media type"


class Unauthorized(AppError):
    status, title = 401, "Unauthorized"


class ServiceUnavailable(AppError):
    status, title = 503, "Service unavailable"
