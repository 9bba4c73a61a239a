"""The one error shape of every endpoint: ``{"error": "<line>", "type": "<type>"}``."""
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


def bad_request(message: str) -> ApiError:
    return ApiError(400, "bad_request", message)


def not_found(message: str) -> ApiError:
    return ApiError(404, "not_found", message)


def unavailable(message: str, retry_after_s: int = 1) -> ApiError:
    return ApiError(503, "unavailable", message, {"Retry-After": str(max(1, int(retry_after_s)))})


def deadline_exceeded(message: str = "deadline passed before the model answered") -> ApiError:
    return ApiError(504, "timeout", message)
