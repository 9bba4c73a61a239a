"""How both daemons listen: an aiohttp app behind a connection cap and slow-client deadlines.

What a listener guarantees (``Listener`` holds the numbers):

- at most ``max_connections`` HTTP connections are served at once; one past the
  cap gets a raw ``503`` (``Retry-After: 1``, the one error shape, type
  ``unavailable``) and is closed, without reaching the app;
- a connection must deliver a complete request head within ``header_timeout_s``
  of opening, and of its previous answer when kept alive; else it is closed
  (slow-loris). aiohttp's keep-alive timer does this: it is armed when a
  connection opens and after each answer, and partial data does not re-arm it;
- with TLS, the handshake must finish within ``header_timeout_s`` too;
- what aiohttp answers itself (a request it cannot parse) is in the one error
  shape, JSON, like every answer of the app.

A slow *body* is the app's to bound: it arrives while a handler runs, and
``shared.http.read_body`` answers 408 when it is late.

Hot routes (the proxy's chunk calls) can skip aiohttp: an app that sets
``app[FAST_ROUTES]`` has those ``(method, path)`` pairs served by ``FastHandler``,
a lean HTTP/1.1 server protocol (httptools) that keeps every promise above —
the connection cap (it counts among the server's connections), the head
deadline, the one error shape, the body limit (413 before reading it whole)
and deadline (408), the access log, a handler cancelled when its client goes
away (with ``handler_cancellation``), and the drain on shutdown. A connection
whose first request is for another route is handed to aiohttp as it is.

``start_server`` sets up and listens (the caller owns the runner); ``run``
serves until SIGINT/SIGTERM and then drains, for ``python -m ingress`` and
``python -m runtime_proxy``.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import socket
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any, cast

import httptools
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.web_log import AccessLogger
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse

from shared.errors import ApiError, unavailable
from shared.http import body_limits, request_id_of
from shared.logs import ACCESS_LOG_FORMAT, AccessLog
from shared.settings import IngressSettings, ProxySettings
from shared.tls import context_from_files

log = logging.getLogger("lukewarm.serving")

# How long a refused connection may keep sending its request before it is closed. Reading it
# first matters: closing a socket with unread input sends RST, which can destroy the 503 in flight.
REFUSE_LINGER_S = 1.0
# At most one warning per this many seconds while connections are being refused.
REFUSE_LOG_INTERVAL_S = 10.0
DEFAULT_SHUTDOWN_TIMEOUT_S = 30.0
# An app that must stop itself (a proxy fenced off by a newer start) sets this event: a signal's way out.
SHUTDOWN = web.AppKey("shutdown", asyncio.Event)
# The ingress's grace on SIGTERM (``drain``): its callers keep connections alive between requests, and one
# may be sending on an idle connection at the moment it would be closed; that request would be cut off
# (a reset or a disconnect, and a POST is not retried). A second covers callers that send several times a
# second; longer-idle connections then close as they would have (their callers see the close first).
DRAIN_GRACE_S = 1.0
# How often the grace checks whether every connection has gone (their callers closed them as asked).
DRAIN_POLL_S = 0.02
# aiohttp's 128 overflows under a burst of new connections: the kernel then drops SYNs, and
# clients wait a whole retransmit (1 s and up). The kernel caps it at net.core.somaxconn.
BACKLOG = 1024


@dataclasses.dataclass(slots=True)
class FastRequest:
    """One request a fast route gets: the whole body has arrived, within the app's limits."""

    app: web.Application
    method: str
    path: str  # as sent, with the query
    headers: dict[str, str]  # names as sent; a repeated header keeps its first value (as CIMultiDict.get)
    body: bytes
    remote: str


# (status, JSON body, extra headers)
FastAnswer = tuple[int, bytes, "dict[str, str] | None"]
FastRoute = Callable[[FastRequest], Awaitable[FastAnswer]]
# ``(method, path)`` → route; a path that ends in ``/`` takes every path under it (the route parses the rest).
FAST_ROUTES = web.AppKey("fast_routes", dict)


def header(headers: dict[str, str], lowered: str, default: str = "") -> str:
    """A lean request's header (``FastRequest.headers`` keeps the names as sent), by its lower-case name."""
    return next((v for k, v in headers.items() if k.lower() == lowered), default)


def fast_route(routes: dict[tuple[str, str], FastRoute], method: str, path: str) -> FastRoute | None:
    """The route for ``method`` and ``path`` (no query): an exact entry, else a prefix entry's."""
    route = routes.get((method, path))
    if route is None:
        for (route_method, prefix), candidate in routes.items():
            if prefix.endswith("/") and route_method == method and path.startswith(prefix):
                return candidate
    return route


@dataclasses.dataclass
class Closing:
    """Set when the server drains: every answer from then on says ``Connection: close`` and ends its connection."""

    on: bool = False


CLOSING = web.AppKey("closing", Closing)


@dataclasses.dataclass(frozen=True)
class Listener:
    """Where and how one app listens."""

    host: str
    port: int
    ssl_context: ssl.SSLContext | None = None
    max_connections: int = 1024
    # A request head must arrive within this of the connection opening or of the previous answer.
    header_timeout_s: float = 10.0
    # Several processes on one port (``python -m ingress --workers N``): the kernel spreads connections.
    reuse_port: bool = False

    @property
    def scheme(self) -> str:
        return "https" if self.ssl_context is not None else "http"


def ingress_listener(settings: IngressSettings) -> Listener:
    """The ingress's listener; TLS when both ``tls_cert`` and ``tls_key`` are set (SystemExit if one is)."""
    return Listener(settings.ingress_host, settings.ingress_port,
                    ssl_context=context_from_files(settings.tls_cert, settings.tls_key),
                    max_connections=settings.max_connections, header_timeout_s=settings.header_timeout_s,
                    reuse_port=settings.workers > 1 or settings.reuse_port)


def proxy_listener(settings: ProxySettings) -> Listener:
    """The proxy's listener: plain HTTP (it binds loopback or a private network)."""
    return Listener(settings.proxy_host, settings.proxy_port, max_connections=settings.max_connections,
                    header_timeout_s=settings.header_timeout_s)


class _Refusal(asyncio.Protocol):
    """A connection past the cap: answered 503 at once, its input drained, then closed."""

    def __init__(self, loop: asyncio.AbstractEventLoop, answer: bytes) -> None:
        self._loop = loop
        self._answer = answer
        self._transport: asyncio.WriteTransport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._tail = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: no isinstance check here.
        self._transport = cast(asyncio.WriteTransport, transport)
        self._transport.write(self._answer)
        self._timer = self._loop.call_later(REFUSE_LINGER_S, self._close)

    def data_received(self, data: bytes) -> None:
        # Once the head has arrived the client has said its piece (bar a body): close now.
        window = self._tail + data
        if b"\r\n\r\n" in window:
            self._close()
        self._tail = window[-3:]

    def eof_received(self) -> bool:
        return False  # the transport closes itself once the 503 is flushed

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._transport = None

    def _close(self) -> None:
        if self._transport is not None:
            self._transport.close()  # flushes the 503 first


# aiohttp's own answers (a request it cannot parse; a handler raising past the app) by status.
ERROR_TYPES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "too_large",
               431: "too_large", 500: "internal", 504: "timeout"}


class JsonErrorHandler(web.RequestHandler):
    """aiohttp's connection handler, answering its own errors in the one error shape.

    aiohttp answers a request it cannot parse (bad method, header line too long,
    broken framing) before any app middleware runs, in text/plain, and logs each
    with a traceback at ERROR. Here: ``{"error", "type"}`` JSON, the connection
    closed as before, and client mistakes logged at DEBUG only (on a public port
    they are noise an attacker controls).
    """

    __slots__ = ()

    def handle_error(self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if status >= 500:
            self.log_exception("Error handling request from %s", request.remote, exc_info=exc)
            line = "internal error" if status == 500 else _phrase(status)
        else:
            self.logger.debug("refused a malformed request from %s: %s", request.remote, message or exc)
            # aiohttp's message runs over lines (the bytes, a caret under them): its first line says what.
            detail = (message or "").strip().splitlines()[:1]
            line = f"malformed HTTP request: {detail[0].rstrip(':')}" if detail else _phrase(status)
        if request.writer.output_size > 0:
            raise ConnectionError("Response is sent already, cannot send another response with the error message")
        error = ApiError(status, ERROR_TYPES.get(status, "http_error"), line)
        response = web.Response(body=error.json_bytes(), status=status, content_type="application/json")
        response.force_close()
        return response


class _Parsed:
    """httptools callbacks for one request (head and body within the caps)."""

    __slots__ = ("url", "headers", "head_bytes", "body", "body_bytes", "head_done", "complete", "max_body",
                 "error", "expects_continue", "parser", "keep_alive")

    def __init__(self, max_body: int) -> None:
        self.max_body = max_body
        self.url = b""
        self.headers: dict[str, str] = {}
        self.head_bytes = 0
        self.body: list[bytes] = []
        self.body_bytes = 0
        self.head_done = self.complete = self.expects_continue = self.keep_alive = False
        self.error: ApiError | None = None
        self.parser: Any = None  # the httptools parser these callbacks are for

    def on_message_begin(self) -> None:
        if self.complete:
            raise _Pipelined()  # a second request in the same bytes: parsing stops after the first

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > FAST_MAX_HEAD_BYTES:
            self.error = ApiError(414, "too_large", "request line too long")
            raise self.error

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_bytes += len(name) + len(value)
        if self.head_bytes > FAST_MAX_HEAD_BYTES or len(self.headers) >= FAST_MAX_HEADERS:
            self.error = ApiError(431, "too_large", "request head too large")
            raise self.error
        key = name.decode("latin-1")
        if len(key) == 4 and key.lower() == "host" and any(k.lower() == "host" for k in self.headers):
            # Which of two Hosts names the customer would be this parser's guess, not the caller's.
            self.error = ApiError(400, "bad_request", "more than one Host header")
            raise self.error
        # A repeated header keeps its first value, as aiohttp's CIMultiDict.get reads it: the inference route
        # is served by either, and two Authorization headers must name the same key on both.
        self.headers.setdefault(key, value.decode("latin-1"))

    def on_headers_complete(self) -> None:
        self.head_done = True
        # Asked now: once the message is complete the parser has reset for the next one (and says "keep").
        self.keep_alive = bool(self.parser.should_keep_alive())
        length = expect = None
        for name, value in self.headers.items():
            lowered = name.lower()
            if lowered == "content-length":
                length = value
            elif lowered == "expect":
                expect = value
        if length is not None and length.strip().isdigit() and int(length) > self.max_body:
            self.error = ApiError(413, "too_large",
                                  f"body of {int(length)} bytes is over the limit of {self.max_body} bytes")
            raise self.error
        if expect is not None:
            if expect.strip().lower() != "100-continue":
                self.error = ApiError(417, "http_error", f"unknown Expect: {expect[:40]!r}")
                raise self.error
            self.expects_continue = True  # curl waits a second for "100 Continue" before a body over 1 KiB

    def on_body(self, data: bytes) -> None:
        self.body_bytes += len(data)
        if self.body_bytes > self.max_body:
            self.error = ApiError(413, "too_large", f"body is over the limit of {self.max_body} bytes")
            raise self.error
        self.body.append(data)

    def on_message_complete(self) -> None:
        self.complete = True


class _Pipelined(Exception):
    pass


FAST_MAX_HEAD_BYTES = 64 * 1024
FAST_MAX_HEADERS = 100
_REASONS = {s.value: s.phrase for s in HTTPStatus}


class FastHandler(asyncio.Protocol):
    """Serves ``FAST_ROUTES`` on one connection, one request at a time, without aiohttp's per-request machinery
    (its request, response and middleware objects cost more than the chunk's own work on a warm call).

    It registers among ``server``'s connections, so the connection cap counts it and ``runner.cleanup`` drains
    it like aiohttp's own (``close`` / ``shutdown``). The first request for any other route hands the
    connection, bytes as received, to aiohttp's handler (``make_fallback``).
    """

    def __init__(self, server: web.Server, app: web.Application, routes: dict[tuple[str, str], FastRoute],
                 make_fallback: Callable[[], asyncio.Protocol], header_timeout_s: float, body_timeout_s: float,
                 max_body: int, access_log: logging.Logger | None) -> None:
        self._server = server
        self._app = app
        self._routes = routes
        self._make_fallback = make_fallback
        self._loop = asyncio.get_running_loop()
        self._header_timeout_s = header_timeout_s
        self._body_timeout_s = body_timeout_s
        self._max_body = max_body
        self._access_log = AccessLog.of(access_log) if access_log is not None and access_log.isEnabledFor(logging.INFO) \
            else None
        self._cancel_on_lost = server.handler_cancellation
        self._draining = app.get(CLOSING) or Closing()
        self._transport: asyncio.Transport | None = None
        self._remote = ""
        self._parsed: _Parsed | None = None
        self._parser: Any = None
        self._pending = b""  # bytes of the request being received, kept until the route is known
        self._sniffed = False  # this connection's route is known to be fast
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._waiter: asyncio.Future[None] | None = None

    # ---- connection ------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self._remote = str(peer[0]) if isinstance(peer, (tuple, list)) and peer else ""
        self._server._connections[self] = self._transport  # type: ignore[index]  # noqa: SLF001
        self._await_head()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._transport = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        task = self._task
        if task is not None and not task.done():
            if self._cancel_on_lost:
                task.cancel()  # its client is gone (a hedge lost, a request failed): see runtime_proxy/ledger.py
            task.add_done_callback(lambda _: self._forget())
        else:
            self._forget()

    def _forget(self) -> None:
        self._server._connections.pop(self, None)  # type: ignore[call-overload]  # noqa: SLF001
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def close(self) -> None:
        """Stop after the request in flight (aiohttp's ``pre_shutdown``); close now when idle."""
        self._closing = True
        if self._task is None and self._transport is not None:
            self._transport.close()

    async def shutdown(self, timeout: float | None = 15.0) -> None:
        """Wait up to ``timeout`` for the request in flight, then cancel it; the connection is closed."""
        self._closing = True
        task = self._task
        if task is not None and not task.done():
            done, _ = await asyncio.wait({task}, timeout=timeout)
            if not done:
                task.cancel()
                await asyncio.wait({task}, timeout=timeout)
        if self._transport is not None:
            self._transport.close()

    # ---- deadlines: one lazily re-armed timer per connection -------------------------------------------

    def _await_head(self) -> None:
        self._deadline = self._loop.time() + self._header_timeout_s
        if self._timer is None:
            self._timer = self._loop.call_at(self._deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._transport is None or self._task is not None:
            return  # gone, or a handler runs: re-armed once it has answered
        if self._loop.time() < self._deadline:
            self._timer = self._loop.call_at(self._deadline, self._on_timer)
            return
        parsed = self._parsed
        if parsed is not None and parsed.head_done:
            self._refuse(ApiError(408, "timeout", f"the body did not arrive within {self._body_timeout_s:g} s"))
        else:
            self._transport.close()  # no complete head in time (slow-loris): closed, as aiohttp does

    # ---- requests ----------------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._task is not None or self._closing:
            # A client that pipelines: held until the answer in flight went out.
            self._pending += data
            return
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        if not self._sniffed:
            self._pending += data
            line_end = self._pending.find(b"\n")  # a bare LF too: the parser then refuses it (400), not the clock
            if line_end < 0:
                if len(self._pending) > FAST_MAX_HEAD_BYTES:
                    self._refuse(ApiError(414, "too_large", "request line too long"))
                return
            method, _, rest = self._pending[:line_end].rstrip(b"\r").partition(b" ")
            path = rest.rpartition(b" ")[0].partition(b"?")[0].decode("latin-1")
            if fast_route(self._routes, method.decode("latin-1"), path) is None:
                self._hand_over()
                return
            self._sniffed = True
            data, self._pending = self._pending, b""
        if self._parser is None:
            self._parsed = _Parsed(self._max_body)
            self._parser = self._parsed.parser = httptools.HttpRequestParser(self._parsed)
        parsed = self._parsed
        assert parsed is not None
        was_head_done = parsed.head_done
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse(ApiError(400, "bad_request", "protocol upgrades are not served here"))
            return
        except httptools.HttpParserError as exc:
            if not parsed.complete:
                self._refuse(parsed.error or ApiError(400, "bad_request", f"malformed HTTP request: {exc}"))
                return
            # Pipelined requests in one read: serving each would need where the first ended, which httptools
            # does not say. The first is answered with "Connection: close" and the connection closes, as RFC
            # 9112 §9.3.2 allows: a client must not pipeline a POST (nothing else is served here) and must
            # send again what a closed connection left unanswered. Requests pipelined in later reads wait in
            # ``_pending`` and are each served in turn.
            self._closing = True
        if parsed.head_done and not was_head_done and not parsed.complete:
            self._deadline = self._loop.time() + self._body_timeout_s  # the body's own deadline
            if parsed.expects_continue and self._transport is not None:
                self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if parsed.complete:
            self._start(parsed)

    def _hand_over(self) -> None:
        """This connection is for aiohttp: its handler takes the transport and the bytes received so far."""
        transport, data = self._transport, self._pending
        self._pending = b""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._server._connections.pop(self, None)  # type: ignore[call-overload]  # noqa: SLF001
        if transport is None:
            return
        handler = self._make_fallback()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if data:
            handler.data_received(data)

    def _start(self, parsed: _Parsed) -> None:
        keep_alive = parsed.keep_alive
        method = self._parser.get_method().decode("latin-1")
        path = parsed.url.decode("latin-1")
        body = b"".join(parsed.body)
        self._parser = None
        self._parsed = None
        self._sniffed = False  # the next request may be for another route (then aiohttp takes over)
        route = fast_route(self._routes, method, path.partition("?")[0])
        request = FastRequest(self._app, method, path, parsed.headers, body, self._remote)
        self._task = self._loop.create_task(self._serve(route, request, keep_alive and not self._closing))

    async def _serve(self, route: FastRoute | None, request: FastRequest, keep_alive: bool) -> None:
        t0 = time.perf_counter()
        try:
            if route is None:
                raise ApiError(404, "not_found", "Not Found")
            status, body, headers = await route(request)
        except ApiError as exc:
            status, body, headers = exc.status, exc.json_bytes(), exc.headers
        except asyncio.CancelledError:
            self._task = None
            if self._transport is not None:
                self._transport.close()
            raise
        except Exception:  # noqa: BLE001 - the last line of defence answers, and logs why
            incident = uuid.uuid4().hex[:12]
            log.exception("unhandled error %s on %s %s", incident, request.method, request.path)
            status, body, headers = 500, ApiError(500, "internal", f"internal error (incident {incident})").json_bytes(), None
        keep_alive = keep_alive and not self._draining.on  # asked as it answers: a drain may have begun meanwhile
        self._answer(status, body, headers, keep_alive)
        if self._access_log is not None:
            request_id = headers.get("X-Request-Id", "-") if headers else "-"
            self._access_log.add(*access_line(self._remote or "-", f"{request.method} {request.path} HTTP/1.1", status,
                                              len(body), time.perf_counter() - t0,
                                              header(request.headers, "user-agent", "-"), request_id))
        self._task = None
        if self._transport is None:
            return
        if not keep_alive or self._closing:
            self._transport.close()
            return
        self._await_head()
        if self._pending:
            data, self._pending = self._pending, b""
            self._feed(data)

    def _answer(self, status: int, body: bytes, headers: dict[str, str] | None, keep_alive: bool) -> None:
        if self._transport is None or self._transport.is_closing():
            return
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items()) if headers else ""
        if not keep_alive:
            extra += "Connection: close\r\n"
        head = (f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nDate: {rfc822_formatted_time()}\r\n{extra}\r\n").encode("latin-1")
        self._transport.write(head + body)

    def _refuse(self, error: ApiError) -> None:
        """Answer a request that cannot be served (malformed, too large, too slow) and close.

        With an ``X-Request-Id`` (the caller's, when sane) and an access line, as a route's own answers
        have: a 413 or 408 is refused here, before the route runs, and its caller needs the id as much."""
        self._closing = True
        parsed = self._parsed
        sent = parsed.headers if parsed is not None else {}
        rid = request_id_of(header(sent, "x-request-id"))
        body = error.json_bytes()
        self._answer(error.status, body, {**(error.headers or {}), "X-Request-Id": rid}, keep_alive=False)
        if self._access_log is not None:
            first = "-"
            if parsed is not None and parsed.head_done and self._parser is not None:
                first = f"{self._parser.get_method().decode('latin-1')} {parsed.url.decode('latin-1')} HTTP/1.1"
            self._access_log.add(*access_line(self._remote or "-", first, error.status, len(body), 0.0,
                                              header(sent, "user-agent", "-"), rid))
        if self._transport is not None:
            self._transport.close()


def access_line(remote: str, first: str, status: int, size: int, seconds: float, agent: str,
                request_id: str) -> tuple[str, dict[str, Any]]:
    """One access line in ``ACCESS_LOG_FORMAT``, and the ``extra`` fields aiohttp's logger gives it (what a
    JSON line carries)."""
    took = "%06f" % seconds  # noqa: UP031 - aiohttp's own %Tf
    return (f'{remote} "{first}" {status} {size} {took} "{agent}" request_id={request_id}',
            {"remote_address": remote, "first_request_line": first, "response_status": status,
             "response_size": size, "request_time_frac": took, "request_header": {"User-Agent": agent},
             "response_header": {"X-Request-Id": request_id}})


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return f"status {status}"


class BatchedAccessLogger(AbstractAccessLogger):
    """aiohttp's ``AccessLogger`` for ``ACCESS_LOG_FORMAT``: the same line and the same ``extra`` fields (what a
    JSON line carries), written through ``AccessLog`` in batches."""

    def __init__(self, logger: logging.Logger, log_format: str) -> None:
        super().__init__(logger, log_format)
        self._batch = AccessLog.of(logger)

    @property
    def enabled(self) -> bool:
        return self._batch.enabled

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        try:
            first = f"{request.method} {request.path_qs} HTTP/{request.version.major}.{request.version.minor}"
            self._batch.add(*access_line(request.remote or "-", first, response.status, response.body_length, time,
                                         request.headers.get("User-Agent", "-"),
                                         response.headers.get("X-Request-Id", "-")))
        except Exception:  # noqa: BLE001 - as aiohttp's own: a log line never fails the request
            self.logger.exception("Error in logging")


def refusal_bytes(max_connections: int) -> bytes:
    """The raw answer to a connection past the cap."""
    body = unavailable(f"server is at its limit of {max_connections} open connections; retry shortly").json_bytes()
    return (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            b"Retry-After: 1\r\nConnection: close\r\nContent-Length: " + str(len(body)).encode() +
            b"\r\n\r\n" + body)


class GuardedSite(web.BaseSite):
    """A TCP site that admits at most ``max_connections`` connections to the runner's server.

    The cap counts the server's live HTTP connections (``web.Server.connections``);
    with TLS a connection counts once its handshake is done, and the handshake
    itself is bounded by ``handshake_timeout_s``.
    """

    __slots__ = ("_host", "_port", "_max_connections", "_handshake_timeout_s", "_reuse_port", "_answer", "refused",
                 "_last_warning")

    def __init__(self, runner: web.BaseRunner, host: str, port: int, *, max_connections: int,
                 ssl_context: ssl.SSLContext | None = None, handshake_timeout_s: float = 10.0,
                 backlog: int = BACKLOG, reuse_port: bool = False) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=backlog)
        self._host = host
        self._port = port
        self._max_connections = max(1, max_connections)
        self._handshake_timeout_s = handshake_timeout_s
        self._reuse_port = reuse_port
        self._answer = refusal_bytes(self._max_connections)
        self.refused = 0
        self._last_warning = float("-inf")

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context else "http"
        return f"{scheme}://{self._host}:{self.port}"

    @property
    def port(self) -> int:
        """The bound port (the asked one before ``start``; useful with port 0)."""
        if self._server is not None and self._server.sockets:  # type: ignore[attr-defined]
            return int(self._server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]
        return self._port

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._protocol, self._host, self._port, ssl=self._ssl_context, backlog=self._backlog,
            reuse_address=True, reuse_port=self._reuse_port or None,
            ssl_handshake_timeout=self._handshake_timeout_s if self._ssl_context else None)

    def _protocol(self) -> asyncio.BaseProtocol:
        server = self._runner.server
        assert server is not None
        if len(server.connections) < self._max_connections:
            app = getattr(self._runner, "app", None)
            if isinstance(app, web.Application) and FAST_ROUTES in app and self._ssl_context is None:
                return self._fast_handler(server, app, app[FAST_ROUTES])
            return self._aiohttp_handler(server)
        self.refused += 1
        loop = asyncio.get_running_loop()
        if loop.time() - self._last_warning >= REFUSE_LOG_INTERVAL_S:
            self._last_warning = loop.time()
            log.warning("at the limit of %d open connections: refusing new ones with 503 (%d so far)",
                        self._max_connections, self.refused)
        return _Refusal(loop, self._answer)


    @staticmethod
    def _aiohttp_handler(server: web.Server) -> web.RequestHandler:
        # What Server.__call__ builds, with JSON error answers (its kwargs are the runner's).
        return JsonErrorHandler(server, loop=asyncio.get_running_loop(), **server._kwargs)  # noqa: SLF001

    def _fast_handler(self, server: web.Server, app: web.Application,
                      routes: dict[tuple[str, str], FastRoute]) -> FastHandler:
        limits = body_limits(app)
        kwargs = server._kwargs  # noqa: SLF001 - the runner's: keep-alive timeout and access log
        return FastHandler(server, app, routes, lambda: self._aiohttp_handler(server),
                           header_timeout_s=float(kwargs.get("keepalive_timeout", 75.0)),
                           body_timeout_s=limits.timeout_s, max_body=app._client_max_size,  # noqa: SLF001
                           access_log=kwargs.get("access_log"))


def check_bindable(host: str, port: int, reuse_port: bool = False) -> None:
    """OSError now when ``host:port`` cannot be bound: before the app starts, so that a proxy told an
    address this host does not have never publishes a heartbeat nobody can reach, even briefly."""
    for family, kind, proto, _, address in socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                              flags=socket.AI_PASSIVE):
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            probe.bind(address)


async def start_server(app: web.Application, listener: Listener, *, access_log: logging.Logger | None = None,
                       shutdown_timeout_s: float = DEFAULT_SHUTDOWN_TIMEOUT_S,
                       handler_cancellation: bool = False, access_log_format: str = ACCESS_LOG_FORMAT) -> web.AppRunner:
    """Start ``app`` (its startup and cleanup contexts) and listen as ``listener`` says.

    The caller owns the returned runner and must ``await runner.cleanup()``, which
    stops listening, waits up to ``shutdown_timeout_s`` for requests in flight and
    then cancels them. The bound port is ``bound_port(runner)``.
    ``handler_cancellation`` cancels a handler whose client went away; off by
    default because a request already dispatched to a model is cheaper to finish
    than to leave half-done.
    """
    check_bindable(listener.host, listener.port, listener.reuse_port)
    closing = app[CLOSING] = Closing()

    async def say_close(request: web.BaseRequest, response: StreamResponse) -> None:
        if closing.on:
            response.force_close()  # the connection ends after this answer
            response.headers["Connection"] = "close"  # the headers are built by now: say so too

    app.on_response_prepare.append(say_close)
    logger_class = BatchedAccessLogger if access_log_format == ACCESS_LOG_FORMAT else AccessLogger
    runner = web.AppRunner(app, access_log=access_log, shutdown_timeout=shutdown_timeout_s,
                           keepalive_timeout=listener.header_timeout_s, handler_cancellation=handler_cancellation,
                           access_log_class=logger_class, access_log_format=access_log_format)
    await runner.setup()
    try:
        site = GuardedSite(runner, listener.host, listener.port, max_connections=listener.max_connections,
                           ssl_context=listener.ssl_context, handshake_timeout_s=listener.header_timeout_s,
                           reuse_port=listener.reuse_port)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    log.info("listening on %s", site.name)
    return runner


def bound_port(runner: web.BaseRunner) -> int:
    """The port the runner's (first) guarded site listens on."""
    for site in runner.sites:
        if isinstance(site, GuardedSite):
            return site.port
    raise LookupError("the runner has no GuardedSite")


async def serve_until_signal(app: web.Application, listener: Listener, *, access_log: logging.Logger | None = None,
                             shutdown_timeout_s: float = DEFAULT_SHUTDOWN_TIMEOUT_S,
                             handler_cancellation: bool = False, drain_grace_s: float = 0.0) -> None:
    """Serve until SIGINT or SIGTERM (the handlers only set a flag) or the app sets ``app[SHUTDOWN]``,
    then drain (``drain``: ``drain_grace_s`` for requests already on their way) and stop."""
    stop = app.get(SHUTDOWN) or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        runner = await start_server(app, listener, access_log=access_log, shutdown_timeout_s=shutdown_timeout_s,
                                    handler_cancellation=handler_cancellation)
    except OSError as exc:
        raise SystemExit(f"cannot listen on {listener.host}:{listener.port}: {exc.strerror or exc}") from None
    try:
        await stop.wait()
        log.info("stopping: draining requests in flight (up to %.0f s)", shutdown_timeout_s)
    finally:
        await drain(runner, drain_grace_s)
        if access_log is not None:
            AccessLog.of(access_log).flush()


async def drain(runner: web.AppRunner, grace_s: float) -> None:
    """Stop listening, then for up to ``grace_s`` keep the open connections and answer what arrives on them
    with ``Connection: close`` (a request already on its way on a kept-alive connection is served, not cut
    off); then ``runner.cleanup``: idle connections close, requests in flight get the shutdown timeout."""
    loop = asyncio.get_running_loop()
    server = runner.server
    if grace_s > 0 and server is not None:
        for site in list(runner.sites):
            await site.stop()
        runner.app[CLOSING].on = True
        deadline = loop.time() + grace_s
        while server.connections and loop.time() < deadline:
            await asyncio.sleep(DRAIN_POLL_S)  # bounded by the grace; ends early when every caller has closed
    await runner.cleanup()


def run(app: web.Application, listener: Listener, *, access_log: logging.Logger | None = None,
        shutdown_timeout_s: float = DEFAULT_SHUTDOWN_TIMEOUT_S, handler_cancellation: bool = False,
        drain_grace_s: float = 0.0) -> None:
    """Blocking: a daemon's whole life on the current event loop policy (uvloop when installed)."""
    asyncio.run(serve_until_signal(app, listener, access_log=access_log, shutdown_timeout_s=shutdown_timeout_s,
                                   handler_cancellation=handler_cancellation, drain_grace_s=drain_grace_s))
