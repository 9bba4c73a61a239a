"""The proxy's internal HTTP API; only ingresses holding the shared secret may call it.

Every internal call is signed (``shared.signing``): a sniffer can neither
forge nor replay one. What a chunk runs comes from the registry
(``VersionSource``), never from the request's body.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import orjson
from aiohttp import web

from runtime_proxy.failures import runtime_error
from runtime_proxy.ledger import ChunkLedger
from runtime_proxy.replicas import ReplicaManager
from runtime_proxy.runtime import RuntimeFailure
from runtime_proxy.versions import VersionSource
from shared.errors import ApiError, DeadlinePassed, NoCapacity, Unauthorized, bad_request
from shared.http import json_response, read_body
from shared.logs import REQUEST_ID
from shared.messages import ChunkCall, ChunkRequest
from shared.metrics import CONTENT_TYPE, ProxyMetrics
from shared.serving import FAST_ROUTES, FastAnswer, FastRequest
from shared.settings import ProxySettings
from shared.signing import BadSignature, ReplayGuard

MANAGER = web.AppKey("manager", ReplicaManager)
SETTINGS = web.AppKey("proxy_settings", ProxySettings)
VERSIONS = web.AppKey("versions", VersionSource)
SIGNING_KEY = web.AppKey("signing_key", bytes)
REPLAYS = web.AppKey("replays", ReplayGuard)
LEDGER = web.AppKey("ledger", ChunkLedger)
METRICS = web.AppKey("proxy_metrics", ProxyMetrics)
DRAINING = web.AppKey("draining", asyncio.Event)

# Set on an answer given to a copy of a chunk (joined its run in flight, or replayed its answer).
COPY_HEADER = "X-Lukewarm-Copy"

CHUNKS_PATH = "/internal/v1/chunks"
WARM_PATH = "/internal/v1/warm"
STATE_PATH = "/internal/v1/state"
RESOLVE_PATH = "/internal/v1/images/resolve"
RESOLVE_TIMEOUT_S = 300.0


def _check_signature(app: web.Application, method: str, raw_path: str, body: bytes, headers: dict[str, str]) -> None:
    try:
        app[REPLAYS].check(app[SIGNING_KEY], method, raw_path, body, headers, time.time())
    except BadSignature as exc:
        raise Unauthorized(f"internal call refused: {exc}") from None


async def _authorized_body(request: web.Request) -> bytes:
    """The request's body once its signature checks out; 401 otherwise (the reason goes to no one else)."""
    body = await read_body(request)  # bounded by the app's BodyLimits, like every other body
    _check_signature(request.app, request.method, request.raw_path, body, dict(request.headers))
    return body


def _parse_call(body: bytes, needs_inputs: bool) -> ChunkCall:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise bad_request("chunk is not JSON") from None
    return ChunkCall.from_dict(data, needs_inputs)


async def _call(request: web.Request, needs_inputs: bool) -> ChunkCall:
    return _parse_call(await _authorized_body(request), needs_inputs)


def _refuse_when_draining(app: web.Application) -> None:
    if app[DRAINING].is_set():
        # Nothing ran: the ingress sends the chunk to another proxy (or holds it until one beats).
        raise NoCapacity("this proxy is stopping", "draining", retry_after_s=1)


async def _run_chunk(app: web.Application, call: ChunkCall) -> tuple[bytes, bool]:
    """The chunk's answer (JSON) and whether it was a copy's (joined a run in flight, or replayed)."""
    REQUEST_ID.set(call.request_id)  # the ingress's id: on this proxy's log lines and the model's
    spec = await app[VERSIONS].get(call.version, call.created_at)
    chunk = ChunkRequest(spec=spec, inputs=call.inputs, timeout_s=call.timeout_s, request_id=call.request_id,
                         batch=call.batch, chunk_id=call.chunk_id)
    manager, meter = app[MANAGER], app[METRICS]

    async def work(on_start: Callable[[], None]) -> bytes:
        try:
            result = await manager.run_chunk(chunk, may_start=call.may_start, on_start=on_start)
        except ApiError as exc:
            meter.chunk(exc.status)
            raise
        meter.chunk(200, result.start, result.timings)
        return orjson.dumps(result)  # a dataclass: orjson writes what ChunkResult.to_dict gives, without the copy

    # A deploy's number is reused only with a new created_at: the id is scoped to exactly what runs.
    key = f"{spec.key}@{spec.created_at!r}/{call.chunk_id}" if call.chunk_id else ""
    answer, copy = await app[LEDGER].run(key, work)
    if copy:
        meter.copies.labels("answered").inc()
    return answer, copy


async def run_chunk(request: web.Request) -> web.Response:
    _refuse_when_draining(request.app)
    answer, copy = await _run_chunk(request.app, await _call(request, needs_inputs=True))
    headers = {COPY_HEADER: "1"} if copy else None
    return web.Response(body=answer, content_type="application/json", headers=headers)


async def run_chunk_fast(request: FastRequest) -> FastAnswer:
    """``run_chunk`` on the lean server (shared/serving.py): the same checks, answers and errors."""
    app = request.app
    _refuse_when_draining(app)
    _check_signature(app, request.method, request.path, request.body, request.headers)
    answer, copy = await _run_chunk(app, _parse_call(request.body, needs_inputs=True))
    return 200, answer, ({COPY_HEADER: "1"} if copy else None)


async def warm(request: web.Request) -> web.Response:
    """Pre-warm: a ready replica of the version here, without running anything on it."""
    _refuse_when_draining(request.app)
    call = await _call(request, needs_inputs=False)
    spec = await request.app[VERSIONS].get(call.version, call.created_at)
    kind, timings = await request.app[MANAGER].warm(spec, call.timeout_s, call.replicas)
    return json_response({"start": kind, "timings": timings, "proxy_id": request.app[SETTINGS].proxy_id})


async def resolve_image(request: web.Request) -> web.Response:
    """The content id an image reference names here (pulled when missing): a deploy pins its version to it."""
    try:
        body = orjson.loads(await _authorized_body(request))
    except orjson.JSONDecodeError:
        raise bad_request("body is not JSON") from None
    image = body.get("image") if isinstance(body, dict) else None
    if not isinstance(image, str) or not image or len(image) > 300:
        raise bad_request('body must be {"image": "<reference>"}')
    manager = request.app[MANAGER]
    try:
        async with asyncio.timeout(RESOLVE_TIMEOUT_S):
            image_id = await manager.runtime.resolve_image(image)
    except RuntimeFailure as exc:
        raise runtime_error(exc, image) from None
    except TimeoutError:
        raise DeadlinePassed(f"resolving {image} took longer than {RESOLVE_TIMEOUT_S:g} s") from None
    return json_response({"image": image, "image_id": image_id})


async def state(request: web.Request) -> web.Response:
    await _authorized_body(request)
    manager = request.app[MANAGER]
    return json_response({"proxy_id": request.app[SETTINGS].proxy_id, "replicas": manager.snapshot(),
                          "waiting": manager.waiting()})


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text, no credentials (DESIGN.md): bind the proxy to a private network."""
    manager = request.app[MANAGER]
    gpus = await manager.gpu.snapshot() if manager.gpu is not None else []
    body = request.app[METRICS].render(manager.snapshot(), manager.waiting(), gpus)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def healthz(request: web.Request) -> web.Response:
    return json_response({"ok": True, "proxy_id": request.app[SETTINGS].proxy_id})


def add_routes(app: web.Application) -> None:
    # The warm path skips aiohttp's request machinery; the aiohttp route stays for the same calls over TLS
    # or any server without the lean protocol.
    app[FAST_ROUTES] = {("POST", CHUNKS_PATH): run_chunk_fast}
    app.router.add_post(CHUNKS_PATH, run_chunk)
    app.router.add_post(WARM_PATH, warm)
    app.router.add_get(STATE_PATH, state)
    app.router.add_post(RESOLVE_PATH, resolve_image)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
