"""``/status``: the fleet page for staff on call; server-rendered HTML and a little JS that refreshes it.

Who may see it: the admin token, sent as ``Authorization: Bearer`` (scripts), or typed once into the
sign-in form, which sets a session cookie (HttpOnly, SameSite=Strict, Path=/status, Secure over TLS).

Sessions are expiring tokens signed with a key derived from the admin token, not ids kept in memory:
behind a load balancer the page's refreshes land on any ingress and each must accept them; they outlive
an ingress restart (a rolling upgrade signs nobody out); they need no Redis (the page is most wanted
while Redis is down); and rotating the admin token ends them all. The price: signing out ends a session
at once only at the ingress that was asked (it remembers the session's id, bounded); elsewhere the
cookie, which the browser has dropped, stays valid until it expires (12 h at most).

What it shows: every proxy as its heartbeat in Redis says (GPUs with NVML memory and utilisation,
heartbeat ages), each version's replicas by state, and the starts and errors of the requests this
ingress answered recently (an in-memory ring: ``note_outcome`` and ``note_failure`` are inference's
hooks). When Redis does not answer it falls back to this ingress's view and says so.

Everything shown is escaped: proxy ids, version keys and error texts come from heartbeats and models,
which an attacker may shape. The Content-Security-Policy lets only this page's own inline script and
style (by nonce) run, and lets them talk to this origin only: no external assets.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import hmac
import html
import math
import secrets
import time
import urllib.parse
from collections.abc import Iterable
from typing import Any

import redis.asyncio as redis
from aiohttp import web

from ingress import state
from ingress.auth import is_admin
from ingress.dispatch import Outcome
from ingress.hosts import customer_from_host
from ingress.router import ProxyState
from ingress.status_auth import SESSION_LIFETIME_S, LoginLimiter, SignOuts, issue_session, read_session
from shared.errors import ApiError, Forbidden, Unauthorized, bad_request
from shared.http import read_body
from shared.messages import START_PHASES, HostCapacity, ProxyHeartbeat, ReplicaReport, VersionSpec

PAGE_PATH = "/status"
FLEET_PATH = "/status/fleet"  # under the cookie's Path, so the page's refreshes carry it
LOGIN_PATH = "/status/login"
LOGOUT_PATH = "/status/logout"
COOKIE = "lukewarm_status"
REFRESH_S = 5.0
MAX_FORM_BYTES = 4096
FORM_TIMEOUT_S = 10.0
REDIS_READ_TIMEOUT_S = 3.0  # then the page answers from the view: it must work while Redis is failing
MAX_ROWS = 500  # per table: a huge fleet still renders a page a browser can hold
MAX_TEXT = 400  # characters of an error message kept and shown
KNOWN_STATES = ("starting", "running", "paused", "stopped")
# Timings that are not phases of a start (the rest, e.g. gpu_ms, are shown with the start).
NOT_START = frozenset({"queue", "infer", "total", "route"})


# ---- what this ingress saw: recent starts and errors ---------------------------------------------

@dataclasses.dataclass(frozen=True)
class StartRecord:
    ts: float
    version: str
    tier: str  # lukewarm | cold
    proxies: tuple[str, ...]
    phases: tuple[tuple[str, float], ...]  # (phase, ms), START_PHASES first
    request_id: str

    @property
    def total_ms(self) -> float:
        return sum(ms for _, ms in self.phases)


@dataclasses.dataclass(frozen=True)
class ErrorRecord:
    ts: float
    where: str  # a version key, or the customer and path when the request never reached one
    kind: str
    message: str
    request_id: str


def start_phases(timings: dict[str, float]) -> tuple[tuple[str, float], ...]:
    """The start phases in a request's timings, in START_PHASES order, then any others (``gpu``)."""
    # Never raises: it runs on the request's path, and a proxy's figures are taken as they came.
    named = {k[:-3]: float(v) for k, v in timings.items()
             if k.endswith("_ms") and k[:-3] not in NOT_START and isinstance(v, (int, float))}
    order = [p for p in START_PHASES if p in named] + sorted(set(named) - set(START_PHASES))
    return tuple((p, round(named[p], 1)) for p in order)


class Activity:
    """The last ``max_records`` starts and errors of requests this ingress answered (memory is bounded;
    another ingress keeps its own)."""

    def __init__(self, max_records: int = 50) -> None:
        self.starts: collections.deque[StartRecord] = collections.deque(maxlen=max_records)
        self.errors: collections.deque[ErrorRecord] = collections.deque(maxlen=max_records)

    def outcome(self, version: str, request_id: str, outcome: Outcome, now: float) -> None:
        if outcome.start != "warm":
            self.starts.append(StartRecord(now, version, outcome.start, tuple(outcome.proxies),
                                           start_phases(outcome.timings), request_id))
        if outcome.error is not None:
            self.errors.append(ErrorRecord(now, version, "model_error", outcome.error[:MAX_TEXT], request_id))

    def failure(self, where: str, request_id: str, exc: ApiError, now: float) -> None:
        self.errors.append(ErrorRecord(now, where[:200], exc.type, exc.message[:MAX_TEXT], request_id))


ACTIVITY = web.AppKey("status_activity", Activity)
SIGN_OUTS = web.AppKey("status_sign_outs", SignOuts)
LOGIN_LIMITER = web.AppKey("status_login_limiter", LoginLimiter)


def note_outcome(app: web.Application, spec: VersionSpec, request_id: str, outcome: Outcome) -> None:
    """Inference's hook for an answered request: its start (when not warm) and its model error, if any."""
    activity = app.get(ACTIVITY)
    if activity is not None:
        activity.outcome(spec.key, request_id, outcome, time.time())


def note_failure(app: web.Application, host: str, path: str, request_id: str, exc: ApiError) -> None:
    """Inference's hook for a request (to ``host`` and ``path``) that failed: kept when it is the fleet's
    failure (5xx), not the caller's (4xx: a caller could fill the ring with its own mistakes)."""
    activity = app.get(ACTIVITY)
    if activity is None or exc.status < 500:
        return
    customer = customer_from_host(host, app[state.SETTINGS].base_domain) or "?"
    activity.failure(f"{customer} {path}", request_id, exc, time.time())


# ---- the page's data -----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Fleet:
    """What the page shows, as plain data (``render_fleet`` turns it into HTML)."""

    now: float
    redis_error: str  # "" when Redis answered this read, else what went wrong
    redis_ms: float
    view_age_s: float  # since the view's last successful refresh (inf: never)
    max_age_s: float  # a heartbeat older than this is not routed to
    proxies: tuple[ProxyHeartbeat, ...]
    malformed: tuple[str, ...] = ()  # what heartbeats that do not parse say their proxy is
    routed: frozenset[str] = frozenset()  # proxies this ingress's view routes to
    starts: tuple[StartRecord, ...] = ()
    errors: tuple[ErrorRecord, ...] = ()


def parse_heartbeats(raws: Iterable[Any]) -> tuple[list[ProxyHeartbeat], list[str]]:
    """Heartbeats as Redis holds them → the parsed ones, and the proxy ids of those that do not parse."""
    parsed: list[ProxyHeartbeat] = []
    malformed: list[str] = []
    for raw in raws:
        try:
            parsed.append(ProxyHeartbeat.from_dict(raw))
        except (KeyError, TypeError, ValueError, AttributeError):
            malformed.append(str(raw.get("proxy_id") if isinstance(raw, dict) else raw)[:200])
    return sorted(parsed, key=lambda p: p.proxy_id), malformed


def from_view(proxy: ProxyState) -> ProxyHeartbeat:
    """A proxy as the view holds it, in the heartbeat's shape (what the view keeps: no replica ids)."""
    capacity = HostCapacity(max_replicas=proxy.max_replicas, cpus=proxy.cpus, load1=proxy.load1,
                            memory_mb=proxy.memory_mb, memory_available_mb=proxy.memory_available_mb,
                            memory_budget_mb=proxy.memory_budget_mb,
                            max_replicas_per_customer=proxy.max_replicas_per_customer)
    replicas = tuple(ReplicaReport("", r.version, r.state, r.in_flight, r.concurrency, memory_mb=r.memory_mb,
                                   cpus=r.cpus, gpu=r.gpu) for r in proxy.replicas)
    gpus = tuple(dataclasses.asdict(g) for g in proxy.gpus)
    return ProxyHeartbeat(proxy.proxy_id, proxy.url, proxy.epoch, proxy.ts, capacity=capacity, replicas=replicas,
                          waiting=dict(proxy.waiting), gpus=gpus)


def replicas_by_version(proxies: Iterable[ProxyHeartbeat]) -> dict[str, list[tuple[str, ReplicaReport]]]:
    """Version key → its replicas with their proxy ids, versions sorted."""
    out: dict[str, list[tuple[str, ReplicaReport]]] = {}
    for proxy in proxies:
        for replica in proxy.replicas:
            out.setdefault(replica.version, []).append((proxy.proxy_id, replica))
    return dict(sorted(out.items()))


async def read_fleet(request: web.Request) -> Fleet:
    """The fleet from Redis (one read, bounded in time), or from this ingress's view when Redis fails."""
    app = request.app
    view = app[state.VIEW]
    activity = app[ACTIVITY]
    t0 = time.perf_counter()
    redis_error = ""
    try:
        raws = await asyncio.wait_for(app[state.REGISTRY].list_proxies(), REDIS_READ_TIMEOUT_S)
        proxies, malformed = parse_heartbeats(raws)
    except (redis.RedisError, OSError, TimeoutError) as exc:
        redis_error = f"unreachable ({type(exc).__name__})"
    except ValueError:
        redis_error = "a heartbeat there is not JSON"  # orjson's error, from a key someone else wrote
    if redis_error:
        proxies, malformed = sorted((from_view(p) for p in view.live_proxies()), key=lambda p: p.proxy_id), []
    return Fleet(now=time.time(), redis_error=redis_error, redis_ms=(time.perf_counter() - t0) * 1000,
                 view_age_s=view.stale_s(), max_age_s=app[state.DISPATCHER].max_age_s, proxies=tuple(proxies),
                 malformed=tuple(malformed), routed=frozenset(view.proxies), starts=tuple(activity.starts),
                 errors=tuple(activity.errors))


# ---- rendering: every value through _e -------------------------------------------------------------

def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _clock(ts: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(ts)) + " UTC"


def _num(value: object, unit: str = "") -> str:
    """A figure from a heartbeat (any JSON: a GPU's dict is passed on as the proxy sent it), or a dash."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "—"
    return f"{value:g}{unit}" if isinstance(value, float) else f"{value}{unit}"


def _table(headers: Iterable[str], rows: list[str], empty: str) -> str:
    if not rows:
        return f'<p class="muted">{_e(empty)}</p>'
    more = f'<p class="muted">… and {len(rows) - MAX_ROWS} more</p>' if len(rows) > MAX_ROWS else ""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows[:MAX_ROWS])}</tbody></table>{more}"


def _row(*cells: str) -> str:
    """Cells already escaped (or built from escaped parts)."""
    return "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"


def _state(name: str) -> str:
    css = name if name in KNOWN_STATES else "other"  # a class name from a fixed set, never from the data
    return f'<span class="state {css}">{_e(name)}</span>'


def _gpu(gpu: dict[str, Any]) -> str:
    name = f" {_e(gpu['name'])}" if gpu.get("name") else ""
    holder = f" · {_e(gpu['version'])}" if gpu.get("version") else ""
    flags = " · swapping" if gpu.get("swapping") else ""
    flags += " · stale" if gpu.get("stale") else ""
    return (f"<div>{_e(str(gpu.get('uuid'))[:16])}{name}: {_num(gpu.get('memory_used_mb'))} / "
            f"{_num(gpu.get('memory_total_mb'))} MiB, util {_num(gpu.get('utilization_pct'), ' %')}"
            f"{holder}{flags}</div>")


def _gpus(proxy: ProxyHeartbeat) -> str:
    cells = "".join(_gpu(g) for g in proxy.gpus)
    if proxy.nvml and proxy.nvml != "ok":
        cells += f'<div class="muted">NVML: {_e(proxy.nvml)}</div>'
    return cells or "—"


def _proxy_row(proxy: ProxyHeartbeat, fleet: Fleet) -> str:
    age_s = fleet.now - proxy.ts
    age = f'<span class="{"bad" if age_s > fleet.max_age_s else "ok"}">{age_s:.1f} s</span>'
    routed = "yes" if proxy.proxy_id in fleet.routed else '<span class="bad">no</span>'
    cap = proxy.capacity
    host = (f"{_num(cap.cpus)} CPUs, load {_num(cap.load1)}, "
            f"{_num(cap.memory_available_mb)} / {_num(cap.memory_mb)} MiB free" if cap.cpus or cap.memory_mb
            else '<span class="muted">not reported</span>')
    in_flight = sum(r.in_flight for r in proxy.replicas)
    return _row(_e(proxy.proxy_id), _e(proxy.url), _e(proxy.epoch), age, routed,
                f"{len(proxy.replicas)} / {_num(cap.max_replicas)}", _num(in_flight), host, _gpus(proxy))


def _version_block(version: str, replicas: list[tuple[str, ReplicaReport]], waiting: int) -> str:
    counts = collections.Counter(r.state for _, r in replicas)
    summary = " · ".join(f"{_e(s)} {counts[s]}" for s in (*KNOWN_STATES, *sorted(set(counts) - set(KNOWN_STATES)))
                         if counts[s] or s in ("running", "paused", "stopped"))
    rows = [_row(_e(proxy_id), _e(r.replica_id or "—"), _state(r.state), f"{r.in_flight} / {r.concurrency}",
                 f"{_num(r.idle_s)} s", f"{_num(r.memory_used_mb)} / {_num(r.memory_mb)} MiB",
                 _e(r.gpu_uuid or ("yes" if r.gpu else "—")))
            for proxy_id, r in sorted(replicas, key=lambda pr: (pr[0], pr[1].replica_id))]
    table = _table(("proxy", "replica", "state", "in flight", "idle", "memory used / limit", "GPU"), rows, "")
    return (f'<div class="version"><h3>{_e(version)}</h3><p>{summary}'
            f"{f' · waiting {waiting}' if waiting else ''}</p>{table}</div>")


def _overview(fleet: Fleet) -> str:
    redis_state = (f'<span class="bad">{_e(fleet.redis_error)}</span>: showing this ingress\'s last view'
                   if fleet.redis_error else f'<span class="ok">ok</span> ({fleet.redis_ms:.0f} ms)')
    view = "never refreshed" if math.isinf(fleet.view_age_s) else f"refreshed {fleet.view_age_s:.1f} s ago"
    replicas = sum(len(p.replicas) for p in fleet.proxies)
    return (f'<p class="overview">Redis: {redis_state} · view {view} · {len(fleet.proxies)} proxies · '
            f"{replicas} replicas · as of {_clock(fleet.now)}</p>")


def render_fleet(fleet: Fleet) -> str:
    """The fleet as an HTML fragment: what ``/status`` shows and its refreshes replace."""
    proxies = _table(("proxy", "url", "epoch", "heartbeat age", "routed here", "replicas", "in flight", "host",
                      "GPUs"), [_proxy_row(p, fleet) for p in fleet.proxies], "No proxy is sending heartbeats.")
    if fleet.malformed:
        proxies += ('<p class="bad">Heartbeats that do not parse, from: '
                    + ", ".join(_e(m) for m in fleet.malformed[:MAX_ROWS]) + "</p>")
    waiting: collections.Counter[str] = collections.Counter()
    for p in fleet.proxies:
        waiting.update(p.waiting)
    versions = "".join(_version_block(v, rs, waiting[v]) for v, rs in replicas_by_version(fleet.proxies).items())
    starts = _table(("time", "version", "tier", "proxy", "start ms", "phases (ms)", "request"), [
        _row(_clock(s.ts), _e(s.version), _e(s.tier), _e(", ".join(s.proxies)), f"{s.total_ms:.1f}",
             _e(" · ".join(f"{p} {ms:g}" for p, ms in s.phases) or "—"), _e(s.request_id))
        for s in reversed(fleet.starts)], "No starts since this ingress started.")
    errors = _table(("time", "where", "type", "message", "request"), [
        _row(_clock(e.ts), _e(e.where), _e(e.kind), f'<span class="msg">{_e(e.message)}</span>', _e(e.request_id))
        for e in reversed(fleet.errors)], "No errors since this ingress started.")
    return (f"{_overview(fleet)}<section><h2>Proxies</h2>{proxies}</section>"
            f"<section><h2>Versions</h2>{versions or '<p class=muted>No replicas.</p>'}</section>"
            f"<section><h2>Recent starts <small>(at this ingress)</small></h2>{starts}</section>"
            f"<section><h2>Recent errors <small>(at this ingress)</small></h2>{errors}</section>")


STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#1d1d1f;background:#fafafa}
header{display:flex;gap:1em;align-items:baseline;flex-wrap:wrap}h1{font-size:1.4em;margin:0}
h2{font-size:1.1em;margin:1.4em 0 .4em}h3{font-size:1em;margin:.8em 0 .2em;font-family:monospace}
table{border-collapse:collapse;background:#fff}th,td{border:1px solid #ddd;padding:.25em .5em;text-align:left;
vertical-align:top}th{background:#f0f0f0}.muted{color:#777}.ok{color:#1a7f37}.bad{color:#b42318;font-weight:600}
.state{padding:0 .4em;border-radius:.3em}.state.running{background:#d1f4dc}.state.paused{background:#fff1c2}
.state.stopped{background:#e4e4e4}.state.starting{background:#d6e6ff}.state.other{background:#f7d4d4}
.msg{font-family:monospace;white-space:pre-wrap;word-break:break-word}form.inline{display:inline;margin:0}
.signin{max-width:22em;margin-top:3em}.signin input{width:100%;margin:.3em 0 .8em;padding:.3em}
"""

# Refreshes the fleet in place; a 401 (session over) reloads into the sign-in form. Never more than one
# request at a time, none while the tab is hidden.
SCRIPT = """
(function () {
  var fleet = document.getElementById("fleet"), stamp = document.getElementById("updated");
  function later() { setTimeout(refresh, %(refresh_ms)d); }
  function refresh() {
    if (document.hidden) { later(); return; }
    fetch("%(path)s", {credentials: "same-origin", cache: "no-store"}).then(function (r) {
      if (r.status === 401) { location.reload(); return null; }
      if (!r.ok) { throw new Error("HTTP " + r.status); }
      return r.text();
    }).then(function (body) {
      if (body === null) { return; }
      fleet.innerHTML = body;  // server-rendered, every value escaped there
      stamp.textContent = "updated " + new Date().toLocaleTimeString();
      stamp.className = "muted";
      later();
    }).catch(function (err) {
      stamp.textContent = "refresh failed (" + err.message + "), retrying";
      stamp.className = "bad";
      later();
    });
  }
  later();
})();
"""


def _document(body: str, nonce: str, script: bool) -> str:
    js = f'<script nonce="{nonce}">{SCRIPT % {"refresh_ms": int(REFRESH_S * 1000), "path": FLEET_PATH}}</script>'
    return ('<!doctype html><html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1"><title>Lukewarm status</title>'
            f'<style nonce="{nonce}">{STYLE}</style></head><body>{body}{js if script else ""}</body></html>')


def fleet_document(fleet_html: str, nonce: str) -> str:
    header = ('<header><h1>Lukewarm fleet</h1><span id="updated" class="muted">'
              f'refreshes every {REFRESH_S:g} s</span><form class="inline" method="post" action="{LOGOUT_PATH}">'
              '<button type="submit">Sign out</button></form></header>')
    return _document(f'{header}<main id="fleet">{fleet_html}</main>', nonce, script=True)


def signin_document(message: str, nonce: str) -> str:
    note = f'<p class="bad">{_e(message)}</p>' if message else ""
    form = (f'<form method="post" action="{LOGIN_PATH}"><label for="token">Admin token</label>'
            '<input id="token" name="token" type="password" autocomplete="current-password" required autofocus>'
            '<button type="submit">Sign in</button></form>')
    return _document(f'<header><h1>Lukewarm fleet</h1></header><main class="signin"><h2>Sign in</h2>{note}'
                     f"{form}</main>", nonce, script=False)


def security_headers(nonce: str) -> dict[str, str]:
    """Only this response's own script and style run; fetches go to this origin; no framing, no caching.
    Referrer-Policy same-origin, not no-referrer: with no-referrer a browser sends ``Origin: null`` on
    the form's POST, which the CSRF check must refuse."""
    return {
        "Content-Security-Policy": (f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
                                    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; "
                                    "base-uri 'none'"),
        "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY", "Referrer-Policy": "same-origin",
        "Cache-Control": "no-store",
    }


def _html(document: str, nonce: str, status: int = 200) -> web.Response:
    return web.Response(text=document, status=status, content_type="text/html", headers=security_headers(nonce))


# ---- handlers ------------------------------------------------------------------------------------

def _signed_in(request: web.Request) -> bool:
    """The admin token as a bearer, or a session cookie it signed that nobody signed out here."""
    admin_token = request.app[state.SETTINGS].admin_token
    if is_admin(request, admin_token):
        return True
    found = read_session(admin_token, request.cookies.get(COOKIE, ""), time.time())
    return found is not None and not request.app[SIGN_OUTS].revoked(found[0])


def _check_same_origin(request: web.Request) -> None:
    """CSRF: with SameSite=Strict the cookie never rides a cross-site request; the form's POSTs must
    also say they come from this host (browsers send Origin, or at least Referer, on a POST)."""
    source = request.headers.get("Origin") or request.headers.get("Referer") or ""
    netloc = urllib.parse.urlsplit(source).netloc.lower() if source != "null" else ""
    if not netloc or netloc != (request.host or "").lower():
        raise Forbidden("this form must be posted from the status page itself")


async def _form_token(request: web.Request) -> str:
    length = request.content_length
    if length is None or length > MAX_FORM_BYTES:
        raise ApiError(413, "too_large", f"the sign-in form is at most {MAX_FORM_BYTES} bytes, with a length")
    raw = await read_body(request, FORM_TIMEOUT_S)
    try:
        fields = urllib.parse.parse_qs(raw.decode("utf-8", "replace"), max_num_fields=4)
    except ValueError:
        raise bad_request("the sign-in form has one field, token") from None
    return (fields.get("token") or [""])[0]


def _signin(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    nonce = secrets.token_urlsafe(16)
    response = _html(signin_document(message, nonce), nonce, status)
    response.headers.update(headers or {})
    return response


async def page(request: web.Request) -> web.Response:
    if _signed_in(request):
        nonce = secrets.token_urlsafe(16)
        return _html(fleet_document(render_fleet(await read_fleet(request)), nonce), nonce)
    if request.headers.get("Authorization"):
        # A script with a wrong token wants the error, not a form.
        raise Unauthorized("this page needs the admin token")
    return _signin(200, "")


async def fleet_fragment(request: web.Request) -> web.Response:
    if not _signed_in(request):
        raise Unauthorized("sign in at /status, or send the admin token as a bearer")
    nonce = secrets.token_urlsafe(16)
    return _html(render_fleet(await read_fleet(request)), nonce)


async def login(request: web.Request) -> web.Response:
    _check_same_origin(request)
    now = time.time()
    client = request.remote or "?"
    limiter = request.app[LOGIN_LIMITER]
    wait_s = limiter.retry_after_s(client, now)
    if wait_s > 0:
        # Refused before the token is looked at: a correct guess must not get through the limit either.
        return _signin(429, f"Too many failed sign-ins: try again in {math.ceil(wait_s)} s.",
                       {"Retry-After": str(math.ceil(wait_s))})
    token = await _form_token(request)
    admin_token = request.app[state.SETTINGS].admin_token
    if not admin_token or not hmac.compare_digest(token.encode(), admin_token.encode()):
        limiter.failed(client, now)
        return _signin(401, "That is not the admin token.")
    response = web.Response(status=303, headers={"Location": PAGE_PATH, "Cache-Control": "no-store"})
    response.set_cookie(COOKIE, issue_session(admin_token, now, secrets.token_hex(16)), max_age=SESSION_LIFETIME_S,
                        path=PAGE_PATH, httponly=True, samesite="Strict", secure=request.secure or None)
    return response


async def logout(request: web.Request) -> web.Response:
    _check_same_origin(request)
    now = time.time()
    found = read_session(request.app[state.SETTINGS].admin_token, request.cookies.get(COOKIE, ""), now)
    if found is not None:
        request.app[SIGN_OUTS].revoke(found[0], found[1], now)
    response = web.Response(status=303, headers={"Location": PAGE_PATH, "Cache-Control": "no-store"})
    response.del_cookie(COOKIE, path=PAGE_PATH, httponly=True, samesite="Strict", secure=request.secure or None)
    return response


async def to_page(request: web.Request) -> web.Response:
    """A reload of the sign-in or sign-out URL: back to the page."""
    return web.Response(status=303, headers={"Location": PAGE_PATH})


def add_routes(app: web.Application) -> None:
    """The page's routes and its in-memory state (bounded: the activity ring, sign-outs, failed sign-ins)."""
    app[ACTIVITY] = Activity()
    app[SIGN_OUTS] = SignOuts()
    app[LOGIN_LIMITER] = LoginLimiter()
    app.router.add_get(PAGE_PATH, page)
    app.router.add_get(FLEET_PATH, fleet_fragment)
    app.router.add_post(LOGIN_PATH, login)
    app.router.add_get(LOGIN_PATH, to_page)
    app.router.add_post(LOGOUT_PATH, logout)
    app.router.add_get(LOGOUT_PATH, to_page)
