"""The proxy's internal HTTP API; only ingresses holding the shared secret may call it."""
from __future__ import annotations

import hmac

from aiohttp import web

from runtime_proxy.replicas import ReplicaManager
from shared.errors import ApiError
from shared.http import bearer, json_response, read_json
from shared.messages import ChunkRequest
from shared.settings import ProxySettings

MANAGER = web.AppKey("manager", ReplicaManager)
SETTINGS = web.AppKey("proxy_settings", ProxySettings)

CHUNKS_PATH = "/internal/v1/chunks"
WARM_PATH = "/internal/v1/warm"


def _authorize(request: web.Request) -> None:
    secret = request.app[SETTINGS].proxy_secret
    if not secret or not hmac.compare_digest(bearer(request).encode(), secret.encode()):
        raise ApiError(401, "unauthorized", "missing or wrong proxy secret")


async def run_chunk(request: web.Request) -> web.Response:
    _authorize(request)
    chunk = ChunkRequest.from_dict(await read_json(request))
    result = await request.app[MANAGER].run_chunk(chunk)
    return json_response(result.to_dict())


async def warm(request: web.Request) -> web.Response:
    """Pre-warm: a ready replica of the version here, without running anything on it."""
    _authorize(request)
    body = await read_json(request)
    chunk = ChunkRequest.from_dict({**body, "inputs": []} if isinstance(body, dict) else body)
    kind, timings = await request.app[MANAGER].warm(chunk.spec, chunk.timeout_s)
    return json_response({"start": kind, "timings": timings, "proxy_id": request.app[SETTINGS].proxy_id})


async def state(request: web.Request) -> web.Response:
    _authorize(request)
    return json_response({"proxy_id": request.app[SETTINGS].proxy_id, "replicas": request.app[MANAGER].snapshot()})


async def healthz(request: web.Request) -> web.Response:
    return json_response({"ok": True, "proxy_id": request.app[SETTINGS].proxy_id})


def add_routes(app: web.Application) -> None:
    app.router.add_post(CHUNKS_PATH, run_chunk)
    app.router.add_post(WARM_PATH, warm)
    app.router.add_get("/internal/v1/state", state)
    app.router.add_get("/healthz", healthz)
