"""The one error shape of every endpoint: ``{"error": "<line>", "type": "<type>"}``, and the domain errors.

Domain code raises what went wrong in its own words (``NotFound``, ``NoCapacity``,
``ReplicaFailed`` …) and never picks an HTTP status: ``STATUS_OF`` below is the one
table from a domain error to the status the HTTP edge answers. ``ApiError`` is the
edge's form (and what crosses the ingress ↔ proxy hop); every domain error is one,
so the edge renders them all alike.
"""
from __future__ import annotations

from typing import Any

import orjson


class ApiError(Exception):
    """An error answered to a client with a status, a machine type and one line."""

    def __init__(self, status: int, type_: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_
        self.message = first_line(message)
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": self.message, "type": self.type}

    def json_bytes(self) -> bytes:
        return orjson.dumps(self.body())

    @classmethod
    def from_body(cls, status: int, body: Any, headers: dict[str, str] | None = None) -> "ApiError":
        if isinstance(body, dict) and isinstance(body.get("error"), str):
            return cls(status, str(body.get("type") or "error"), body["error"], headers)
        return cls(status, "bad_gateway", f"unexpected answer with status {status}", headers)


def first_line(message: str, limit: int = 500) -> str:
    line = message.strip().splitlines()[0] if message.strip() else "error"
    return line[:limit]


class DomainError(ApiError):
    """What went wrong, named by its class (and a machine type); the status comes from ``STATUS_OF``."""

    kind = "error"

    def __init__(self, message: str, type_: str | None = None, retry_after_s: float | None = None) -> None:
        headers = {"Retry-After": str(max(1, round(retry_after_s)))} if retry_after_s is not None else None
        status = next(STATUS_OF[c] for c in type(self).__mro__ if c in STATUS_OF)  # a subclass maps as its kind
        super().__init__(status, type_ or self.kind, message, headers)


class BadInput(DomainError):
    """The caller sent something malformed or outside the limits."""
    kind = "bad_request"


class Unauthorized(DomainError):
    """No credentials, or unknown, revoked or expired ones."""
    kind = "unauthorized"


class Forbidden(DomainError):
    """Credentials that may not do this (another customer's, a missing scope, another namespace's image)."""
    kind = "forbidden"


class NotFound(DomainError):
    kind = "not_found"


class Conflict(DomainError):
    """The request contradicts the current state (an alias still names the version …)."""
    kind = "conflict"


class TooLarge(DomainError):
    kind = "too_large"


class Refused(DomainError):
    """Well-formed, but it cannot be done: the model raised, an image is nowhere, a rollout never got ready."""
    kind = "refused"


class RateLimited(DomainError):
    kind = "rate_limited"


class NoCapacity(DomainError):
    """Nothing can take it right now; the caller may retry after ``retry_after_s``."""
    kind = "unavailable"


class DeadlinePassed(DomainError):
    kind = "timeout"


class ReplicaFailed(DomainError):
    """The model's replica or its container engine failed (crashed, out of memory, bad answer, no image)."""
    kind = "model_crashed"


class Internal(DomainError):
    """A fault of ours or of the deployment, not of the caller."""
    kind = "internal"


# The one table from domain errors to HTTP statuses.
STATUS_OF: dict[type[DomainError], int] = {
    BadInput: 400, Unauthorized: 401, Forbidden: 403, NotFound: 404, Conflict: 409, TooLarge: 413,
    Refused: 422, RateLimited: 429, Internal: 500, ReplicaFailed: 502, NoCapacity: 503, DeadlinePassed: 504,
}


def bad_request(message: str) -> ApiError:
    return BadInput(message)


def not_found(message: str) -> ApiError:
    return NotFound(message)


def unavailable(message: str, retry_after_s: int = 1) -> ApiError:
    return NoCapacity(message, retry_after_s=max(1, int(retry_after_s)))


def deadline_exceeded(message: str = "deadline passed before the model answered") -> ApiError:
    return DeadlinePassed(message)
