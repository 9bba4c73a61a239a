"""``POST /v1/{model}[/{branch}]/{version}``: the Modelbit-compatible inference endpoint."""
from __future__ import annotations

import logging
import time
import uuid

from aiohttp import web

from ingress import state, status_page
from ingress.auth import require_customer_scope
from ingress.batching import InferenceInput, parse_body, stitch
from ingress.dispatch import Outcome
from ingress.hosts import customer_from_host
from ingress.usage import USAGE
from shared.errors import ApiError, Refused, ReplicaFailed, bad_request
from shared.http import error_response, json_response, read_json
from shared.logs import REQUEST_ID
from shared.messages import START_PHASES, VersionSpec, check_branch, check_name, start_ms

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


def _request_id(request: web.Request) -> str:
    """The caller's id when it is a sane token (it is echoed in headers and logs), else a fresh one."""
    given = request.headers.get("X-Request-Id", "")
    if 0 < len(given) <= 128 and given.isascii() and given.isprintable() and " " not in given:
        return given
    return uuid.uuid4().hex


PRIORITY_HEADER = "X-Lukewarm-Priority"
# The request's metric labels, set once its version resolved (the customer and model exist).
LABELS = web.RequestKey("metric_labels", tuple)


def _is_batch_work(request: web.Request) -> bool:
    """``X-Lukewarm-Priority: batch`` marks work that yields to on-demand requests (the default)."""
    value = request.headers.get(PRIORITY_HEADER, "on-demand").strip().lower()
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


async def infer(request: web.Request) -> web.Response:
    request_id = _request_id(request)
    REQUEST_ID.set(request_id)  # this handler's task (and the chunk tasks it starts): every log line carries it
    headers = {"X-Request-Id": request_id}
    t0 = time.perf_counter()
    in_flight = request.app[state.METRICS].in_flight
    in_flight.inc()
    try:
        return await _infer(request, request_id, headers)
    except ApiError as exc:
        status_page.note_failure(request, request_id, exc)
        # Labelled by customer and model only once both are known to exist: a caller's unchecked Host
        # or path must not mint new series (memory) in the ingress.
        customer, model = request.get(LABELS, ("", ""))
        request.app[state.METRICS].request(customer, model, exc.status)
        headers.setdefault("Server-Timing", f"route;dur={(time.perf_counter() - t0) * 1000:.2f}")
        return error_response(exc, headers)
    finally:
        in_flight.dec()


async def _infer(request: web.Request, request_id: str, headers: dict[str, str]) -> web.Response:
    t0 = time.perf_counter()
    app = request.app
    settings = app[state.SETTINGS]
    view = app[state.VIEW]
    customer = customer_from_host(request.host, settings.base_domain)
    if customer is None:
        raise bad_request(f"the Host header must name a customer: <customer>.{settings.base_domain}")
    await require_customer_scope(request, view, customer, "predict")
    with app[state.LIMITER].admit(customer):
        return await _admitted(request, customer, request_id, headers, t0)


async def _admitted(request: web.Request, customer: str, request_id: str, headers: dict[str, str],
                    t0: float) -> web.Response:
    app = request.app
    settings = app[state.SETTINGS]
    view = app[state.VIEW]
    model = check_name("model", request.match_info["model"])
    branch = check_branch(request.match_info.get("branch", "main").replace("~", "/"))
    pointer = _version_pointer(request.match_info["version"])
    batch = _is_batch_work(request)
    body = parse_body(await read_json(request), settings.max_batch_items)
    spec = await view.resolve(customer, model, branch, pointer)
    request[LABELS] = (spec.customer, spec.model)
    # Usage: from here on the request is the version's (ingress/usage.py says what counts); in memory only.
    with app[USAGE].counting(spec):
        try:
            return await _resolved(request, spec, body, batch, request_id, headers, t0)
        except ApiError as exc:
            if exc.type != "version_changed":
                raise
        # The proxy refused it, nothing ran: the number names another deploy now (given back and
        # reused, or restored after a Redis data loss) than the one this ingress cached. Once more, fresh.
        view.forget_version(spec.key)
        fresh = await view.resolve(customer, model, branch, pointer)
        return await _resolved(request, fresh, body, batch, request_id, headers, t0)


async def _resolved(request: web.Request, spec: VersionSpec, body: InferenceInput, batch: bool, request_id: str,
                    headers: dict[str, str], t0: float) -> web.Response:
    app = request.app
    headers["X-Model-Version"] = str(spec.version)
    timeout_s = min(spec.timeout_s, body.timeout_s or spec.timeout_s)
    route_ms = (time.perf_counter() - t0) * 1000
    outcome = await app[state.DISPATCHER].run(spec, body.inputs, time.time() + timeout_s, request_id, batch=batch)
    total_s = time.perf_counter() - t0
    headers["Server-Timing"] = server_timing(route_ms, outcome.timings, outcome.start)
    _log_request(request, spec, request_id, outcome, total_s)
    status_page.note_outcome(request, spec, request_id, outcome)
    if outcome.error is not None:
        # The traceback stays in the logs: it may reveal code or data the caller should not see.
        log.info("request %s: model %s raised: %s\n%s", request_id, spec.key, outcome.error, outcome.traceback or "")
        raise Refused(outcome.error, "model_error")
    if len(outcome.outputs) != len(body.inputs):
        raise ReplicaFailed(f"the model returned {len(outcome.outputs)} outputs for {len(body.inputs)} inputs",
                            "bad_model_output")
    app[state.METRICS].request(spec.customer, spec.model, 200)
    app[state.METRICS].answered(total_s, outcome.start)
    return json_response({"data": stitch(body.ids, outcome.outputs)}, headers=headers)


def _log_request(request: web.Request, spec: VersionSpec, request_id: str, outcome: Outcome, total_s: float) -> None:
    request.app[state.REQUEST_LOG].add(spec.customer, spec.model, spec.branch, {
        "request_id": request_id, "ts": time.time(), "version": spec.version,
        "ms": round(total_s * 1000, 3), "start": outcome.start, "stdout": outcome.stdout,
        "stderr": outcome.stderr, "error": outcome.error, "traceback": outcome.traceback,
        "proxies": outcome.proxies,
    })


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/{model}/{version}", infer)
    app.router.add_post("/v1/{model}/{branch}/{version}", infer)
