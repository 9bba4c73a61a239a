"""shared.serving's lean protocol for ``FAST_ROUTES`` over real sockets: it answers like the app would, hands
other routes to aiohttp on the same connection, and keeps the listener's bounds (body size, head and body
deadlines, malformed input, the connection cap, cancellation when the client leaves, the drain)."""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator

import orjson
import pytest
from aiohttp import web

from loadtests.common import wait_until
from shared.errors import ApiError
from shared.logs import AccessLog
from shared.serving import (
    FAST_ROUTES,
    FastAnswer,
    FastRequest,
    Listener,
    bound_port,
    start_server,
)
from tests.support.loops import Scenario  # and the run_on fixture (tests/conftest.py)
from tests.unit.test_serving import draining_for, refuses_connections

IO_TIMEOUT_S = 10.0
HEADER_TIMEOUT_S = 1.0
CANCELLED = web.AppKey("cancelled", asyncio.Event)
SLEEPING = web.AppKey("sleeping", asyncio.Event)


def fast_app(max_body: int = 1024) -> web.Application:
    app = web.Application(client_max_size=max_body)
    app[CANCELLED] = asyncio.Event()
    app[SLEEPING] = asyncio.Event()

    async def echo(request: FastRequest) -> FastAnswer:
        if request.body == b"raise":
            raise ApiError(409, "conflict", "asked to refuse", {"Retry-After": "3"})
        if request.body == b"crash":
            raise RuntimeError("boom")
        if request.body.startswith(b"sleep"):
            request.app[SLEEPING].set()
            try:
                await asyncio.sleep(float(request.body[5:]))
            except asyncio.CancelledError:
                request.app[CANCELLED].set()
                raise
        return 200, orjson.dumps({"body": request.body.decode(), "sig": request.headers.get("X-Sig", ""),
                                  "path": request.path}), {"X-Copy": "1"}

    async def hello(request: web.Request) -> web.Response:
        return web.json_response({"hello": True})

    app[FAST_ROUTES] = {("POST", "/fast"): echo}
    app.router.add_get("/hello", hello)
    return app


async def serving(app: web.Application, max_connections: int = 100,
                  access_log: logging.Logger | None = None) -> tuple[web.AppRunner, int]:
    runner = await start_server(app, Listener("127.0.0.1", 0, max_connections=max_connections,
                                              header_timeout_s=HEADER_TIMEOUT_S), handler_cancellation=True,
                                access_log=access_log)
    return runner, bound_port(runner)


def post(body: bytes, path: str = "/fast", extra: bytes = b"") -> bytes:
    return (b"POST " + path.encode() + b" HTTP/1.1\r\nHost: t\r\nX-Sig: abc\r\n" + extra +
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IO_TIMEOUT_S)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
    body = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", "0"))), IO_TIMEOUT_S)
    return status, headers, body


async def closed(reader: asyncio.StreamReader) -> bool:
    try:
        return await asyncio.wait_for(reader.read(), IO_TIMEOUT_S) == b""
    except ConnectionResetError:
        return True


def test_fast_route_answers_and_keeps_the_connection(run_on: Callable[[Scenario], None]) -> None:
    async def scenario() -> None:
        runner, port = await serving(fast_app())
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            for i in range(3):
                writer.write(post(f"x{i}".encode()))
                status, headers, body = await read_answer(reader)
                assert status == 200 and headers["x-copy"] == "1"
                assert headers["content-type"] == "application/json"
                assert orjson.loads(body) == {"body": f"x{i}", "sig": "abc", "path": "/fast"}
            # Another route on the same connection: aiohttp takes over, as it is.
            writer.write(b"GET /hello HTTP/1.1\r\nHost: t\r\n\r\n")
            status, _, body = await read_answer(reader)
            assert status == 200 and orjson.loads(body) == {"hello": True}
            writer.close()
        finally:
            await runner.cleanup()

    run_on(scenario)


def test_errors_in_the_one_shape(run_on: Callable[[Scenario], None]) -> None:
    async def scenario() -> None:
        runner, port = await serving(fast_app())
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(post(b"raise"))
            status, headers, body = await read_answer(reader)
            assert (status, headers["retry-after"]) == (409, "3")
            assert orjson.loads(body) == {"error": "asked to refuse", "type": "conflict"}
            writer.write(post(b"crash"))
            status, _, body = await read_answer(reader)
            assert status == 500 and orjson.loads(body)["type"] == "internal"
            writer.close()
        finally:
            await runner.cleanup()

    run_on(scenario)


@pytest.mark.parametrize("request_bytes, status", [
    (post(b"x" * 2000), 413),  # over client_max_size, refused on its Content-Length
    (b"POST /fast HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n800\r\n" + b"x" * 2048 + b"\r\n0\r\n\r\n",
     413),  # over the limit without a Content-Length
    (b"POST /fast HTTP/1.1\r\nHost: t\r\nContent-Length: nope\r\n\r\n", 400),
    (b"POST /fast HTTP/1.1\nHost: t\nContent-Length: 2\n\n{}", 400),  # bare LFs: refused, not left to the clock
    (b"POST /fast HTTP/1.1\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(200)) + b"\r\n", 431),
    (b"POST /fast HTTP/1.1\r\nHost: t\r\nExpect: 200-ok\r\nContent-Length: 3\r\n\r\nabc", 417),
    # Which Host names the customer would be this server's guess: refused, not guessed.
    (b"POST /fast HTTP/1.1\r\nHost: a.example\r\nhost: b.example\r\nContent-Length: 3\r\n\r\nabc", 400),
])
def test_bad_requests_are_refused_and_closed(run_on: Callable[[Scenario], None], request_bytes: bytes,
                                             status: int) -> None:
    async def scenario() -> None:
        runner, port = await serving(fast_app())
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request_bytes)
            got, headers, body = await read_answer(reader)
            assert got == status and set(orjson.loads(body)) == {"error", "type"}
            assert len(headers["x-request-id"]) == 32  # refused before any route ran, yet with an id (DESIGN.md)
            assert await closed(reader)
            writer.close()
        finally:
            await runner.cleanup()

    run_on(scenario)


def test_a_head_that_never_ends_is_cut_off(run_on: Callable[[Scenario], None]) -> None:
    async def scenario() -> None:
        runner, port = await serving(fast_app())
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"POST /fast HTTP/1.1\r\nHost: t\r\n")  # the head never completes
            t0 = asyncio.get_running_loop().time()
            assert await closed(reader)
            assert asyncio.get_running_loop().time() - t0 < HEADER_TIMEOUT_S + 2
            writer.close()
        finally:
            await runner.cleanup()

    run_on(scenario)


def test_a_body_that_never_ends_gets_408() -> None:
    async def scenario() -> None:
        app = fast_app()
        from shared.http import LIMITS, BodyLimits
        app[LIMITS] = BodyLimits(timeout_s=0.5)
        runner, port = await serving(app)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"POST /fast HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nabc")
            status, _, body = await read_answer(reader)
            assert status == 408 and orjson.loads(body)["type"] == "timeout"
            writer.close()
        finally:
            await runner.cleanup()

    asyncio.run(scenario())


def test_a_client_that_leaves_cancels_its_handler_and_cleanup_drains() -> None:
    async def scenario() -> None:
        app = fast_app()
        runner, port = await serving(app)
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(post(b"sleep5"))
            await asyncio.sleep(0.2)
            writer.close()
            await asyncio.wait_for(app[CANCELLED].wait(), IO_TIMEOUT_S)
            # A request in flight at shutdown is awaited (it finishes within the drain's timeout).
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(post(b"sleep0.3"))
            await asyncio.sleep(0.1)
        finally:
            await runner.cleanup()
        status, _, _ = await read_answer(reader)
        assert status == 200

    asyncio.run(scenario())


def test_fast_connections_count_toward_the_cap() -> None:
    async def scenario() -> None:
        runner, port = await serving(fast_app(), max_connections=1)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(post(b"a"))
            assert (await read_answer(reader))[0] == 200
            reader2, writer2 = await asyncio.open_connection("127.0.0.1", port)
            writer2.write(post(b"b"))
            status, headers, _ = await read_answer(reader2)
            assert status == 503 and headers["retry-after"] == "1"
            writer.close()
            writer2.close()
        finally:
            await runner.cleanup()

    asyncio.run(scenario())


def test_pipelined_requests_get_the_first_answer_then_a_close() -> None:
    async def scenario() -> None:
        runner, port = await serving(fast_app())
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(post(b"one") + post(b"two"))
            status, headers, body = await read_answer(reader)
            assert status == 200 and orjson.loads(body)["body"] == "one" and headers["connection"] == "close"
            assert await closed(reader)
            writer.close()
        finally:
            await runner.cleanup()

    asyncio.run(scenario())


def test_a_draining_server_answers_a_fast_route_on_an_open_connection_with_a_close(
        run_on: Callable[[Scenario], None]) -> None:
    async def scenario() -> None:
        runner, port = await serving(fast_app())
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(post(b"one"))
        status, headers, _ = await read_answer(reader)
        assert status == 200 and "connection" not in headers
        async with draining_for(runner, 60) as draining:
            await wait_until(lambda: refuses_connections(port), IO_TIMEOUT_S, "the listener to close")
            writer.write(post(b"two"))
            status, headers, body = await read_answer(reader)
            assert status == 200 and orjson.loads(body)["body"] == "two"
            assert headers["connection"] == "close"
            assert await closed(reader)
            await asyncio.wait_for(draining, IO_TIMEOUT_S)

    run_on(scenario)


def test_a_body_sent_after_100_continue_is_answered(run_on: Callable[[Scenario], None]) -> None:
    async def scenario() -> None:
        runner, port = await serving(fast_app())
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            # curl's way with a body over 1 KiB: the head, then a wait (a second) for the go-ahead.
            writer.write(b"POST /fast HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n")
            assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IO_TIMEOUT_S) == \
                b"HTTP/1.1 100 Continue\r\n\r\n"
            writer.write(b"abc")
            status, headers, body = await read_answer(reader)
            assert status == 200 and orjson.loads(body)["body"] == "abc"
            assert "date" in headers  # RFC 9110: an origin server with a clock dates its answers
            writer.close()
        finally:
            await runner.cleanup()

    run_on(scenario)


def test_a_prefix_route_takes_every_path_under_it_and_only_those(run_on: Callable[[Scenario], None]) -> None:
    async def scenario() -> None:
        app = fast_app()

        async def under(request: FastRequest) -> FastAnswer:
            return 200, orjson.dumps({"path": request.path}), None

        app[FAST_ROUTES] = {**app[FAST_ROUTES], ("POST", "/pre/"): under}
        runner, port = await serving(app)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            for path in (b"/pre/a", b"/pre/a/b?x=1", b"/fast"):
                writer.write(post(b"{}", path.decode()))
                status, _, body = await read_answer(reader)
                assert status == 200 and orjson.loads(body)["path"] == path.decode()
            writer.close()
            # Not under the prefix (no slash), or another method: aiohttp's router answers, as before.
            for request in (post(b"{}", "/prefix"), b"GET /pre/a HTTP/1.1\r\nHost: t\r\n\r\n"):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(request)
                status, headers, _ = await read_answer(reader)
                assert status in (404, 405) and "aiohttp" in headers.get("server", "")
                writer.close()
        finally:
            await runner.cleanup()

    run_on(scenario)


@contextlib.contextmanager
def access_records(name: str) -> Iterator[tuple[logging.Logger, list[logging.LogRecord]]]:
    """A logger for a server's access lines, and the records it got (flushed when the block ends)."""
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger.addHandler(handler)
    try:
        yield logger, records
    finally:
        AccessLog.of(logger).flush()
        logger.removeHandler(handler)


def test_an_access_line_names_the_answer_s_request_id_with_aiohttp_s_fields(
        run_on: Callable[[Scenario], None]) -> None:
    async def scenario() -> None:
        with access_records("test.fast.access") as (logger, records):
            await answer_with_id(logger)
        (record,) = records
        assert record.getMessage().startswith('127.0.0.1 "POST /fast HTTP/1.1" 200 2 ')
        assert record.getMessage().endswith('"probe/1" request_id=r-42')
        assert record.__dict__["response_header"] == {"X-Request-Id": "r-42"}
        assert record.__dict__["request_header"] == {"User-Agent": "probe/1"}

    async def answer_with_id(logger: logging.Logger) -> None:
        app = fast_app()

        async def with_id(request: FastRequest) -> FastAnswer:
            return 200, b"{}", {"X-Request-Id": "r-42"}

        app[FAST_ROUTES] = {("POST", "/fast"): with_id}
        runner, port = await serving(app, access_log=logger)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(post(b"{}", extra=b"user-agent: probe/1\r\n"))  # found whatever its case, as aiohttp finds it
            assert (await read_answer(reader))[0] == 200
            writer.close()
        finally:
            await runner.cleanup()

    run_on(scenario)


def test_an_answer_that_ends_after_the_drain_began_says_close(run_on: Callable[[Scenario], None]) -> None:
    async def scenario() -> None:
        app = fast_app()
        runner, port = await serving(app)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(post(b"sleep0.3"))
        await asyncio.wait_for(app[SLEEPING].wait(), IO_TIMEOUT_S)
        async with draining_for(runner, 60) as draining:
            status, headers, _ = await read_answer(reader)
            assert status == 200 and headers["connection"] == "close"
            assert await closed(reader)
            await asyncio.wait_for(draining, IO_TIMEOUT_S)

    run_on(scenario)


def test_a_refusal_echoes_the_caller_s_request_id_and_writes_an_access_line(
        run_on: Callable[[Scenario], None]) -> None:
    async def scenario() -> None:
        with access_records("test.fast.refusals") as (logger, records):
            runner, port = await serving(fast_app(), access_log=logger)
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(post(b"x" * 2000, extra=b"X-Request-Id: mine-7\r\nUser-Agent: probe/2\r\n"))
                status, headers, body = await read_answer(reader)
                assert (status, headers["x-request-id"], orjson.loads(body)["type"]) == (413, "mine-7", "too_large")
                writer.close()
            finally:
                await runner.cleanup()
        (record,) = records
        assert record.getMessage().startswith('127.0.0.1 "POST /fast HTTP/1.1" 413 ')
        assert record.getMessage().endswith('"probe/2" request_id=mine-7')

    run_on(scenario)
