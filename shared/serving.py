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
from http import HTTPStatus
from typing import cast

from aiohttp import web

from shared.errors import ApiError, unavailable
from shared.logs import ACCESS_LOG_FORMAT
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
# aiohttp's 128 overflows under a burst of new connections: the kernel then drops SYNs, and
# clients wait a whole retransmit (1 s and up). The kernel caps it at net.core.somaxconn.
BACKLOG = 1024


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


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return f"status {status}"


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
            # What Server.__call__ builds, with JSON error answers (its kwargs are the runner's).
            return JsonErrorHandler(server, loop=asyncio.get_running_loop(), **server._kwargs)  # noqa: SLF001
        self.refused += 1
        loop = asyncio.get_running_loop()
        if loop.time() - self._last_warning >= REFUSE_LOG_INTERVAL_S:
            self._last_warning = loop.time()
            log.warning("at the limit of %d open connections: refusing new ones with 503 (%d so far)",
                        self._max_connections, self.refused)
        return _Refusal(loop, self._answer)


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
    runner = web.AppRunner(app, access_log=access_log, shutdown_timeout=shutdown_timeout_s,
                           keepalive_timeout=listener.header_timeout_s, handler_cancellation=handler_cancellation,
                           access_log_format=access_log_format)
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
                             handler_cancellation: bool = False) -> None:
    """Serve until SIGINT or SIGTERM (the handlers only set a flag) or the app sets ``app[SHUTDOWN]``,
    then drain and stop."""
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
        await runner.cleanup()


def run(app: web.Application, listener: Listener, *, access_log: logging.Logger | None = None,
        shutdown_timeout_s: float = DEFAULT_SHUTDOWN_TIMEOUT_S, handler_cancellation: bool = False) -> None:
    """Blocking: a daemon's whole life on the current event loop policy (uvloop when installed)."""
    asyncio.run(serve_until_signal(app, listener, access_log=access_log, shutdown_timeout_s=shutdown_timeout_s,
                                   handler_cancellation=handler_cancellation))
