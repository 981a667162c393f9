"""One error hierarchy for the whole fleet; every error renders as the same JSON shape.

Shape: ``{"error": {"code": "...", "message": "...", "request_id": "..."}}``.
"""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """Base error: an HTTP status, a stable machine-readable code and a safe message."""

    status: int = 500
    code: str = "internal_error"
    retry_after: int | None = None

    def __init__(
        self,
        message: str = "internal error",
        *,
        code: str | None = None,
        status: int | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        if retry_after is not None:
            self.retry_after = retry_after

    def to_dict(self, request_id: str | None = None) -> dict[str, Any]:
        """The ``error`` object of the JSON body."""
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if request_id:
            body["request_id"] = request_id
        return body


class BadRequest(ServiceError):
    status, code = 400, "bad_request"


class InvalidImage(ServiceError):
    status, code = 400, "invalid_image"


class UnsupportedMediaType(ServiceError):
    status, code = 415, "unsupported_media_type"


class PayloadTooLarge(ServiceError):
    status, code = 413, "payload_too_large"


class ImageTooLarge(ServiceError):
    status, code = 413, "image_too_large"


class NotFound(ServiceError):
    status, code = 404, "not_found"


class UnknownModel(ServiceError):
    status, code = 404, "unknown_model"


class ModelNotReady(ServiceError):
    status, code, retry_after = 503, "model_not_ready", 5


class ModelUnavailable(ServiceError):
    status, code, retry_after = 503, "model_unavailable", 2


class Overloaded(ServiceError):
    """The model cannot take this request now; ``reason`` (for metrics) says why."""

    status, code, retry_after = 503, "overloaded", 1

    def __init__(self, message: str, *, retry_after: int | None = None, reason: str = "overloaded") -> None:
        super().__init__(message, retry_after=retry_after)
        self.reason = reason


class DeadlineExceeded(ServiceError):
    status, code = 504, "deadline_exceeded"


class UpstreamTimeout(ServiceError):
    status, code = 504, "upstream_timeout"


class BadUpstreamResponse(ServiceError):
    status, code = 502, "bad_upstream_response"


class WeightsUnavailable(ServiceError):
    """Raised at start-up when the requested weights cannot be found or fetched."""

    status, code = 500, "weights_unavailable"


class Unauthorized(ServiceError):
    """No key, or a key that is not valid (401)."""

    status, code = 401, "unauthorized"


class Forbidden(ServiceError):
    """A valid key without the scope the route needs (403)."""

    status, code = 403, "forbidden"


class QuotaExceeded(ServiceError):
    """Past one of a principal's (or the fleet's) quotas: the body names it with its figures."""

    status, code, retry_after = 429, "quota_exceeded", 30

    def __init__(self, quota: str, limit: int, used: int, message: str) -> None:
        super().__init__(message)
        self.quota, self.limit, self.used = quota, limit, used

    def to_dict(self, request_id: str | None = None) -> dict[str, Any]:
        return {**super().to_dict(request_id), "quota": self.quota, "limit": self.limit, "used": self.used}


class UploadTooSlow(ServiceError):
    status, code = 408, "upload_too_slow"


class InsufficientStorage(ServiceError):
    status, code = 507, "insufficient_storage"


class TooManyFineTuned(ServiceError):
    """A base's service already serves as many fine-tuned models as it may load."""

    status, code = 409, "too_many_fine_tuned"
