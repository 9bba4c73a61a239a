"""``GET /openapi.json``: the ingress's HTTP API as OpenAPI 3.1, kept true by a test (every route is here,
and nothing here is not a route: tests/unit/test_openapi.py)."""
from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from ingress.management import BRANCH_PATH
from ingress.usage import USAGE_PATH

ERROR = {"$ref": "#/components/schemas/Error"}
OBJECT: dict[str, Any] = {"type": "object"}


def _op(summary: str, auth: str, ok: int = 200, body: dict[str, Any] | None = None, answer: Any = OBJECT,
        query: tuple[tuple[str, str], ...] = (), errors: tuple[int, ...] = (400, 401, 403, 404)) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "responses": {str(ok): {"description": "OK", "content": {"application/json": {"schema": answer}}},
                      **{str(s): {"description": "error", "content": {"application/json": {"schema": ERROR}}}
                         for s in errors}},
    }
    if auth:
        op["security"] = [{auth: []}]
    if body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    if query:
        op["parameters"] = [{"name": n, "in": "query", "required": False, "schema": {"type": "string"},
                             "description": d} for n, d in query]
    return op


def _html(summary: str) -> dict[str, Any]:
    return {"summary": summary, "responses": {"200": {"description": "HTML", "content": {"text/html": {}}},
                                              "303": {"description": "redirect"}}}


VERSION_SETTINGS = {"type": "object", "description": "image, entrypoint, env, batch_size, gpu, memory_mb, cpus, "
                    "gpu_memory_mb, capacity {min, desired, max}, idle_timeout_s (seconds or \"auto\"), keep_warm, timeout_s, "
                    "max_concurrency, at_most_once"}
INFERENCE = {"type": "object", "required": ["data"],
             "properties": {"data": {"description": "one input, or a batch [[id, input], …]"},
                            "timeout_seconds": {"type": "integer", "minimum": 1}}}

PATHS: dict[str, dict[str, Any]] = {
    "/v1/{model}/{version}": {"post": _op("Call a model (latest, a version number or an alias)", "apiKey",
                                          body=INFERENCE, errors=(400, 401, 403, 404, 408, 413, 422, 429, 502,
                                                                  503, 504))},
    "/v1/{model}/{branch}/{version}": {"post": _op("Call a model on a branch ('/' in a branch as '~')", "apiKey",
                                                   body=INFERENCE, errors=(400, 401, 403, 404, 408, 413, 422, 429,
                                                                           502, 503, 504))},
    "/api/v1/customers/{customer}": {"put": _op("Create a customer (idempotent)", "admin", ok=201)},
    "/api/v1/customers/{customer}/keys": {
        "post": _op("Create an API key {scopes?, expires_in_s?}; the key is shown once", "deployKey", ok=201,
                    body=OBJECT),
        "get": _op("List the customer's key ids", "deployKey")},
    "/api/v1/customers/{customer}/keys/{key_id}": {"delete": _op("Revoke a key", "deployKey", ok=204)},
    BRANCH_PATH + "/versions": {"post": _op("Deploy a new version", "deployKey", ok=201, body=VERSION_SETTINGS,
                                            errors=(400, 401, 403, 404, 422)),
                                "get": _op("The branch's live versions and its pointers (latest, aliases)",
                                           "deployKey")},
    BRANCH_PATH + "/versions/{number}": {
        "get": _op("A version's settings", "deployKey"),
        "patch": _op("Change capacity, idle_timeout_s, keep_warm, timeout_s or at_most_once", "deployKey",
                     body=OBJECT),
        "delete": _op("Retire a version", "deployKey")},
    BRANCH_PATH + "/rollback": {"post": _op("Move latest back ({} or {version})", "deployKey", body=OBJECT)},
    BRANCH_PATH + "/aliases/{alias}": {
        "put": _op("Point an alias at a version {version}", "deployKey", body=OBJECT),
        "delete": _op("Delete an alias", "deployKey", ok=204)},
    BRANCH_PATH + "/logs": {"get": _op("Recent requests with their output", "deployKey",
                                       query=(("limit", "1 to 1000, default 50"),))},
    USAGE_PATH: {"get": _op("Requests, errors and replica-seconds per version, hourly", "deployKey",
                            query=(("since", "ISO 8601 or epoch seconds"), ("until", "ISO 8601 or epoch seconds")))},
    "/api/v1/status": {"get": _op("The fleet: proxies and their replicas", "admin")},
    "/status": {"get": _html("The status page for staff (sign-in form when signed out)")},
    "/status/fleet": {"get": _op("The page's fleet data, for its refreshes (session cookie or admin)", "admin")},
    "/status/login": {"post": _html("Sign in with the admin token (form field); sets the session cookie"),
                      "get": _html("Back to the page")},
    "/status/logout": {"post": _html("Sign out"), "get": _html("Back to the page")},
    "/healthz": {"get": _op("Alive", "", errors=())},
    "/readyz": {"get": _op("Ready: Redis reachable and the view fresh (503 degraded otherwise)", "",
                           errors=(503,))},
    "/metrics": {"get": {"summary": "Prometheus metrics",
                         "responses": {"200": {"description": "text format", "content": {"text/plain": {}}}}}},
    "/openapi.json": {"get": _op("This document", "", errors=())},
}

DOCUMENT: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "Lukewarm ingress", "version": "1",
             "description": "Serve customers' ML models. Inference is routed by the host <customer>.<base domain>."},
    "paths": PATHS,
    "components": {
        "schemas": {"Error": {"type": "object", "required": ["error", "type"],
                              "properties": {"error": {"type": "string"}, "type": {"type": "string"}}}},
        "securitySchemes": {
            "apiKey": {"type": "http", "scheme": "bearer", "description": "a customer's API key (predict scope)"},
            "deployKey": {"type": "http", "scheme": "bearer", "description": "a deploy key or the admin token"},
            "admin": {"type": "http", "scheme": "bearer", "description": "the admin token"}},
    },
}
_BODY = orjson.dumps(DOCUMENT)


async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=_BODY, content_type="application/json")


def add_routes(app: web.Application) -> None:
    app.router.add_get("/openapi.json", openapi)
