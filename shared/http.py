"""aiohttp helpers shared by the ingress and the proxy: JSON in, JSON out, one error shape."""
from __future__ import annotations

import logging
import uuid
from typing import Any

import orjson
from aiohttp import web

from shared.errors import ApiError, bad_request

log = logging.getLogger("lukewarm.http")

JSON = "application/json"


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type=JSON, headers=headers)


def error_response(error: ApiError, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=error.json_bytes(), status=error.status, content_type=JSON,
                        headers={**error.headers, **(headers or {})})


async def read_json(request: web.Request) -> Any:
    """The request's JSON body; 413 when over the app's size limit (before reading it whole)."""
    limit = request.app._client_max_size  # noqa: SLF001 - aiohttp keeps the limit here
    length = request.content_length
    if length is not None and length > limit:
        raise ApiError(413, "too_large", f"body of {length} bytes is over the limit of {limit} bytes")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(413, "too_large", f"body is over the limit of {limit} bytes") from None
    if not raw:
        raise bad_request("body must be JSON")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"body is not valid JSON: {exc}") from None


@web.middleware
async def error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Every failure leaves as ``{"error", "type"}``; unexpected ones are logged with their traceback."""
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        kind = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(exc.status, "http_error")
        return error_response(ApiError(exc.status, kind, exc.reason or "error"))
    except Exception:  # noqa: BLE001 - the last line of defence answers, and logs why
        incident = uuid.uuid4().hex[:12]
        log.exception("unhandled error %s on %s %s", incident, request.method, request.path)
        return error_response(ApiError(500, "internal", f"internal error (incident {incident})"))


def bearer(request: web.Request) -> str:
    value = request.headers.get("Authorization", "").strip()
    return value[7:].strip() if value[:7].lower() == "bearer " else value
