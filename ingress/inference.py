"""``POST /v1/{model}[/{branch}]/{version}``: the Modelbit-compatible inference endpoint.

The route is served twice over: by the listener's lean server (``shared.serving.FastHandler``, a
``FAST_ROUTES`` prefix route) on plain HTTP, and by aiohttp's router with TLS (the lean server does
not speak TLS). Both hand ``answer`` the same ``Call``, so one body of code decides every answer.
"""
from __future__ import annotations

import dataclasses
import logging
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping

import orjson
from aiohttp import web

from ingress import state, status_page
from ingress.auth import require_scope
from ingress.batching import InferenceInput, parse_body, stitch
from ingress.dispatch import Outcome
from ingress.hosts import customer_from_host
from ingress.usage import USAGE
from shared.errors import ApiError, Refused, ReplicaFailed, bad_request
from shared.http import JSON, bearer_token, body_limits, parse_json, read_body, request_id_of
from shared.logs import REQUEST_ID
from shared.messages import START_PHASES, VersionSpec, check_branch, check_name, start_ms
from shared.serving import FAST_ROUTES, FastAnswer, FastRequest

log = logging.getLogger("lukewarm.ingress")


def server_timing(route_ms: float, timings: dict[str, float], start: str) -> str:
    parts = [
        f"route;dur={route_ms:.2f}",
        f"queue;dur={timings.get('queue_ms', 0.0):.2f}",
        f'start;desc="{start}";dur={start_ms(timings):.2f}',
        f"infer;dur={timings.get('infer_ms', 0.0):.2f}",
    ]
    for phase in START_PHASES:
        if f"{phase}_ms" in timings:
            parts.append(f"start-{phase};dur={timings[f'{phase}_ms']:.2f}")
    return ", ".join(parts)


PATH_PREFIX = "/v1/"
PRIORITY_HEADER = "X-Lukewarm-Priority"
# (status, JSON body, headers)
Answer = tuple[int, bytes, dict[str, str]]


@dataclasses.dataclass(slots=True)
class Call:
    """One inference request, as either server parsed it."""

    app: web.Application
    host: str
    path: str
    model: str  # the path's segments, percent-decoded, not yet checked
    branch: str
    version: str
    headers: Mapping[str, str]  # answers lower-case names
    read_body: Callable[[], Awaitable[bytes]]  # 413 and 408 as ApiError
    # Its metric labels, set once its version resolved (the customer and model exist).
    labels: tuple[str, str] = ("", "")


def _is_batch_work(call: Call) -> bool:
    """``X-Lukewarm-Priority: batch`` marks work that yields to on-demand requests (the default)."""
    value = call.headers.get("x-lukewarm-priority", "on-demand").strip().lower()
    if value not in ("batch", "on-demand"):
        raise bad_request(f"{PRIORITY_HEADER} must be batch or on-demand")
    return value == "batch"


def _version_pointer(raw: str) -> str:
    """``46``, ``latest`` or an alias; anything else (``²``, 10 000 digits) is 400 before it reaches ``int``."""
    if raw.isdigit():
        if not raw.isascii() or len(raw) > 12 or int(raw) < 1:
            raise bad_request(f"version must be a positive integer, latest or an alias, got {raw[:20]!r}")
    elif raw != "latest":
        check_name("version or alias", raw)
    return raw


async def answer(call: Call) -> Answer:
    """The answer to one inference call: the model's outputs, or the one error shape."""
    request_id = request_id_of(call.headers.get("x-request-id", ""))
    REQUEST_ID.set(request_id)  # this handler's task (and the chunk tasks it starts): every log line carries it
    headers = {"X-Request-Id": request_id}
    t0 = time.perf_counter()
    in_flight = call.app[state.METRICS].in_flight
    in_flight.inc()
    try:
        return await _infer(call, request_id, headers)
    except ApiError as exc:
        status_page.note_failure(call.app, call.host, call.path, request_id, exc)
        # Labelled by customer and model only once both are known to exist: a caller's unchecked Host
        # or path must not mint new series (memory) in the ingress.
        customer, model = call.labels
        call.app[state.METRICS].request(customer, model, exc.status)
        headers.setdefault("Server-Timing", f"route;dur={(time.perf_counter() - t0) * 1000:.2f}")
        return exc.status, exc.json_bytes(), {**exc.headers, **headers}
    finally:
        in_flight.dec()


async def _infer(call: Call, request_id: str, headers: dict[str, str]) -> Answer:
    t0 = time.perf_counter()
    app = call.app
    settings = app[state.SETTINGS]
    view = app[state.VIEW]
    customer = customer_from_host(call.host, settings.base_domain)
    if customer is None:
        raise bad_request(f"the Host header must name a customer: <customer>.{settings.base_domain}")
    await require_scope(bearer_token(call.headers.get("authorization", "")), view, customer, "predict")
    with app[state.LIMITER].admit(customer):
        return await _admitted(call, customer, request_id, headers, t0)


async def _admitted(call: Call, customer: str, request_id: str, headers: dict[str, str], t0: float) -> Answer:
    app = call.app
    settings = app[state.SETTINGS]
    view = app[state.VIEW]
    model = check_name("model", call.model)
    branch = check_branch(call.branch.replace("~", "/"))
    pointer = _version_pointer(call.version)
    batch = _is_batch_work(call)
    body = parse_body(parse_json(await call.read_body(), body_limits(app).max_depth), settings.max_batch_items)
    spec = await view.resolve(customer, model, branch, pointer)
    call.labels = (spec.customer, spec.model)
    # Usage: from here on the request is the version's (ingress/usage.py says what counts); in memory only.
    with app[USAGE].counting(spec):
        try:
            return await _resolved(call, spec, body, batch, request_id, headers, t0)
        except ApiError as exc:
            if exc.type != "version_changed":
                raise
        # The proxy refused it, nothing ran: the number names another deploy now (given back and
        # reused, or restored after a Redis data loss) than the one this ingress cached. Once more, fresh.
        view.forget_version(spec.key)
        fresh = await view.resolve(customer, model, branch, pointer)
        return await _resolved(call, fresh, body, batch, request_id, headers, t0)


async def _resolved(call: Call, spec: VersionSpec, body: InferenceInput, batch: bool, request_id: str,
                    headers: dict[str, str], t0: float) -> Answer:
    app = call.app
    headers["X-Model-Version"] = str(spec.version)
    timeout_s = min(spec.timeout_s, body.timeout_s or spec.timeout_s)
    route_ms = (time.perf_counter() - t0) * 1000
    outcome = await app[state.DISPATCHER].run(spec, body.inputs, time.time() + timeout_s, request_id, batch=batch)
    total_s = time.perf_counter() - t0
    headers["Server-Timing"] = server_timing(route_ms, outcome.timings, outcome.start)
    _log_request(app, spec, request_id, outcome, total_s)
    status_page.note_outcome(app, spec, request_id, outcome)
    if outcome.error is not None:
        # The traceback stays in the logs: it may reveal code or data the caller should not see.
        log.info("request %s: model %s raised: %s\n%s", request_id, spec.key, outcome.error, outcome.traceback or "")
        raise Refused(outcome.error, "model_error")
    if len(outcome.outputs) != len(body.inputs):
        raise ReplicaFailed(f"the model returned {len(outcome.outputs)} outputs for {len(body.inputs)} inputs",
                            "bad_model_output")
    app[state.METRICS].request(spec.customer, spec.model, 200)
    app[state.METRICS].answered(total_s, outcome.start)
    return 200, orjson.dumps({"data": stitch(body.ids, outcome.outputs)}), headers


def _log_request(app: web.Application, spec: VersionSpec, request_id: str, outcome: Outcome, total_s: float) -> None:
    app[state.REQUEST_LOG].add(spec.customer, spec.model, spec.branch, {
        "request_id": request_id, "ts": time.time(), "version": spec.version,
        "ms": round(total_s * 1000, 3), "start": outcome.start, "stdout": outcome.stdout,
        "stderr": outcome.stderr, "error": outcome.error, "traceback": outcome.traceback,
        "proxies": outcome.proxies,
    })


async def infer(request: web.Request) -> web.Response:
    """The route on aiohttp's router (with TLS)."""
    status, body, headers = await answer(Call(
        request.app, request.host, request.path, request.match_info["model"],
        request.match_info.get("branch", "main"), request.match_info["version"], request.headers,
        lambda: read_body(request)))
    return web.Response(body=body, status=status, content_type=JSON, headers=headers)


def _unquoted(text: str) -> str:
    """Percent-escapes decoded, as aiohttp decodes a path: left as sent when they are not UTF-8."""
    try:
        return urllib.parse.unquote(text, errors="strict")
    except UnicodeDecodeError:
        return text


async def infer_fast(request: FastRequest) -> FastAnswer:
    """The route on the lean server: ``request.path`` is anything under ``/v1/``, split here as aiohttp's
    router would (two or three non-empty segments, each percent-decoded; else 404)."""
    path = request.path.partition("?")[0]
    parts = path[len(PATH_PREFIX):].split("/")
    if not 2 <= len(parts) <= 3 or "" in parts:
        raise ApiError(404, "not_found", "Not Found")
    if "%" in path:
        parts = [_unquoted(part) for part in parts]
        path = _unquoted(path)
    headers: dict[str, str] = {}
    for name, value in request.headers.items():
        headers.setdefault(name.lower(), value)  # the first of a repeated header, whatever its case (as aiohttp)
    body = request.body

    async def arrived() -> bytes:  # the lean server answered 413 and 408 before the route ran
        return body

    return await answer(Call(request.app, headers.get("host", ""), path, parts[0],
                             parts[1] if len(parts) == 3 else "main", parts[-1], headers, arrived))


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/{model}/{version}", infer)
    app.router.add_post("/v1/{model}/{branch}/{version}", infer)
    app[FAST_ROUTES] = {("POST", PATH_PREFIX): infer_fast}
