"""One small error hierarchy. Every error has a stable ``code`` and structured ``problems``.

The service maps codes to HTTP statuses in one table (``service.STATUS_BY_CODE``); the CLI prints
the message and the problems.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the input: where (row, column), what was expected, what came."""

    problem: str
    row: int | None = None
    column: str | None = None
    expected: str | None = None
    got: Any = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None or k in ("row", "column")}


class GuardedServingError(Exception):
    """Base class of every error this package raises on purpose."""

    code = "error"

    def __init__(self, message: str, problems: list[Problem] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.problems = list(problems or [])

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"error": self.code, "message": self.message}
        if self.problems:
            body["problems"] = [p.to_dict() for p in self.problems]
        return body


class ConfigError(GuardedServingError):
    """The serving config is missing a key, has one of the wrong type, or names a missing file."""

    code = "config_invalid"


class ProfileError(GuardedServingError):
    """A profile file is malformed, of an unsupported version, or fails its content hash."""

    code = "profile_invalid"


class SchemaError(GuardedServingError):
    """Input rows that do not fit the profile's schema (missing column, uncoercible value)."""

    code = "schema_violation"


class PayloadError(GuardedServingError):
    """A request body that is not JSON or not of the expected shape."""

    code = "bad_request"


class PayloadTooLargeError(GuardedServingError):
    """A request body larger than ``limits.max_body_bytes``."""

    code = "payload_too_large"


class UnsupportedMediaTypeError(GuardedServingError):
    """A request body that is not ``application/json`` (or is compressed)."""

    code = "unsupported_media_type"


class MethodNotAllowedError(GuardedServingError):
    """An HTTP method the route does not serve (``GET /predict``)."""

    code = "method_not_allowed"


class TooManyRequestsError(GuardedServingError):
    """A client that failed the token check too often in a window; ``retry_after`` in seconds."""

    code = "too_many_requests"

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class BatchTooLargeError(GuardedServingError):
    """More rows in one request than the configured maximum."""

    code = "batch_too_large"


class ModelLoadError(GuardedServingError):
    """A model file that cannot be loaded, or a pickle that was not marked trusted."""

    code = "model_load_failed"


class FallbackFailedError(GuardedServingError):
    """The fallback model failed for rows that needed it: no prediction can be given for them."""

    code = "fallback_failed"


class NotFoundError(GuardedServingError):
    """An id (request, row) that the store does not know, or a path the service does not serve."""

    code = "not_found"


class ConflictError(GuardedServingError):
    """A write that contradicts what is already stored (a different outcome for the same row)."""

    code = "conflict"


class UnauthorizedError(GuardedServingError):
    """A call to a protected route without the configured bearer token."""

    code = "unauthorized"


class StoreError(GuardedServingError):
    """The store (SQLite or PostgreSQL) failed or is unreachable."""

    code = "store_unavailable"


class InternalError(GuardedServingError):
    """A bug: what went wrong is in the server's log, never in the answer."""

    code = "internal"


class RetrainError(GuardedServingError):
    """The training script failed, timed out or wrote no candidate."""

    code = "retrain_failed"
