"""aiohttp helpers shared by the ingress and the proxy: JSON in, JSON out, one error shape."""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from typing import Any

import orjson
from aiohttp import web

from shared.errors import ApiError, bad_request

log = logging.getLogger("lukewarm.http")

JSON = "application/json"


@dataclasses.dataclass(frozen=True)
class BodyLimits:
    """How a daemon reads bodies: bounded in time (slow bodies) and nesting (parsers that recurse)."""

    timeout_s: float = 30.0
    max_depth: int = 64


LIMITS = web.AppKey("body_limits", BodyLimits)


def nesting_exceeds(value: Any, limit: int) -> bool:
    """Whether JSON ``value`` nests lists/objects deeper than ``limit`` (iterative: no recursion to exhaust)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = item if isinstance(item, list) else item.values() if isinstance(item, dict) else ()
        stack.extend((child, depth + 1) for child in children if isinstance(child, (list, dict)))
    return False


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type=JSON, headers=headers)


def error_response(error: ApiError, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=error.json_bytes(), status=error.status, content_type=JSON,
                        headers={**error.headers, **(headers or {})})


def body_limits(app: web.Application) -> BodyLimits:
    """The app's body limits (``app[LIMITS]``), or the defaults."""
    return app.get(LIMITS) or BodyLimits()


async def read_body(request: web.Request, timeout_s: float | None = None) -> bytes:
    """The request's body: 413 when over the app's size limit (before reading it whole), 408 when it
    does not arrive within ``timeout_s`` (a slow body holds a connection and a buffer)."""
    limit = request.app._client_max_size  # noqa: SLF001 - aiohttp keeps the limit here
    length = request.content_length
    if length is not None and length > limit:
        raise ApiError(413, "too_large", f"body of {length} bytes is over the limit of {limit} bytes")
    timeout_s = body_limits(request.app).timeout_s if timeout_s is None else timeout_s
    try:
        async with asyncio.timeout(timeout_s):
            return await request.read()
    except TimeoutError:
        raise ApiError(408, "timeout", f"the body did not arrive within {timeout_s:g} s") from None
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(413, "too_large", f"body is over the limit of {limit} bytes") from None


async def read_json(request: web.Request) -> Any:
    """The request's JSON body, nested no deeper than the app's limit (400 otherwise)."""
    return parse_json(await read_body(request), body_limits(request.app).max_depth)


def parse_json(raw: bytes, max_depth: int) -> Any:
    """A request body's JSON, nested no deeper than ``max_depth`` (400 otherwise)."""
    if not raw:
        raise bad_request("body must be JSON")
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"body is not valid JSON: {exc}") from None
    # Counting brackets runs at C speed; only bodies that could nest that deep are walked.
    if raw.count(b"[") + raw.count(b"{") > max_depth and nesting_exceeds(value, max_depth):
        raise bad_request(f"body nests deeper than {max_depth} levels")
    return value


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


def request_id_of(given: str) -> str:
    """The caller's ``X-Request-Id`` when it is a sane token (it is echoed in headers and logs), else a
    fresh one."""
    if 0 < len(given) <= 128 and given.isascii() and given.isprintable() and " " not in given:
        return given
    return uuid.uuid4().hex


def bearer(request: web.Request) -> str:
    return bearer_token(request.headers.get("Authorization", ""))


def bearer_token(authorization: str) -> str:
    """The token of an ``Authorization`` header: ``Bearer <token>``, or the bare token."""
    value = authorization.strip()
    return value[7:].strip() if value[:7].lower() == "bearer " else value
