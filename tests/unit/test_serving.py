"""shared.serving over real sockets: the connection cap answers 503 and closes, a head that dribbles
in is cut off at the header deadline, and requests that complete are served as before."""
from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiohttp import web

from loadtests.common import wait_until
from shared.serving import Listener, bound_port, drain, start_server
from shared.tls import make_dev_ca, server_context
from tests.support.loops import Scenario  # and the run_on fixture (tests/conftest.py)

HEADER_TIMEOUT_S = 1.0
# Bounds every read. Without the header deadline a silent connection would stay open for aiohttp's
# default keep-alive (75 s) and a stalled TLS handshake for asyncio's 60 s: this bound fails both.
IO_TIMEOUT_S = 10.0
HEAD = b"GET / HTTP/1.1\r\nHost: test\r\n\r\n"
RELEASE = web.AppKey("release", asyncio.Event)




def tiny_app() -> web.Application:
    app = web.Application()
    app[RELEASE] = asyncio.Event()

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def slow(request: web.Request) -> web.Response:
        # Longer than the header deadline: a handler at work is never cut off by it.
        await asyncio.sleep(float(request.query.get("s", "0")))
        return web.Response(text="slow ok")

    async def held(request: web.Request) -> web.Response:
        await asyncio.wait_for(request.app[RELEASE].wait(), IO_TIMEOUT_S)
        return web.Response(text="released")

    app.router.add_get("/", hello)
    app.router.add_get("/slow", slow)
    app.router.add_get("/held", held)
    return app


@contextlib.asynccontextmanager
async def serving(max_connections: int = 100, ssl_context: ssl.SSLContext | None = None
                  ) -> AsyncIterator[tuple[web.AppRunner, int]]:
    runner = await start_server(tiny_app(), Listener("127.0.0.1", 0, ssl_context=ssl_context,
                                                     max_connections=max_connections,
                                                     header_timeout_s=HEADER_TIMEOUT_S),
                                shutdown_timeout_s=5)
    try:
        yield runner, bound_port(runner)
    finally:
        await asyncio.wait_for(runner.cleanup(), 30)


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 answer with a Content-Length."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IO_TIMEOUT_S)
    lines = head.decode().split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    body = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", "0"))), IO_TIMEOUT_S)
    return int(lines[0].split()[1]), headers, body


async def closed_by_server(reader: asyncio.StreamReader) -> bool:
    try:
        return await asyncio.wait_for(reader.read(1), IO_TIMEOUT_S) == b""
    except ConnectionResetError:
        return True


def open_connections(runner: web.AppRunner) -> int:
    assert runner.server is not None
    return len(runner.server.connections)


def test_completed_requests_are_served_and_kept_alive(run_on: Callable[[Scenario], None]) -> None:
    async def scenario() -> None:
        async with serving() as (runner, port), aiohttp.ClientSession() as session:
            for _ in range(3):
                async with session.get(f"http://127.0.0.1:{port}/") as resp:
                    assert resp.status == 200 and await resp.text() == "ok"
            assert open_connections(runner) == 1, "one keep-alive connection served all three"
            # A handler slower than the header deadline still answers.
            async with session.get(f"http://127.0.0.1:{port}/slow?s={HEADER_TIMEOUT_S * 2}") as resp:
                assert resp.status == 200 and await resp.text() == "slow ok"

    run_on(scenario)


def test_connection_past_the_cap_gets_503_and_is_closed(run_on: Callable[[Scenario], None]) -> None:
    async def scenario() -> None:
        async with serving(max_connections=2) as (runner, port):
            held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
            for _, writer in held:
                writer.write(b"GET /held HTTP/1.1\r\nHost: test\r\n\r\n")
            await wait_until(lambda: open_connections(runner) == 2, IO_TIMEOUT_S, "two connections served")

            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(HEAD)
            status, headers, body = await read_answer(reader)
            assert status == 503
            assert headers["retry-after"] == "1" and headers["content-type"] == "application/json"
            answer = orjson.loads(body)
            assert answer["type"] == "unavailable" and "2 open connections" in answer["error"]
            assert await closed_by_server(reader)
            writer.close()
            assert open_connections(runner) == 2, "a refused connection never reached the app"

            # The held ones were not disturbed, and once they are done a new connection is served.
            runner.app[RELEASE].set()
            for held_reader, held_writer in held:
                status, _, body = await read_answer(held_reader)
                assert (status, body) == (200, b"released")
                held_writer.close()
            await wait_until(lambda: open_connections(runner) == 0, IO_TIMEOUT_S, "held connections to close")
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(HEAD)
            assert (await read_answer(reader))[::2] == (200, b"ok")
            writer.close()

    run_on(scenario)


def test_a_head_dribbling_in_is_closed_at_the_header_deadline(run_on: Callable[[Scenario], None]) -> None:
    async def scenario() -> None:
        async with serving() as (runner, port), aiohttp.ClientSession() as session:
            opened = time.monotonic()  # before connecting: the server's deadline can only start later
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            got = b""
            # A byte per 0.1 s at least: 100 bytes take 10 deadlines. Were the deadline re-armed by
            # each byte, the whole head would dribble in without the connection being closed.
            partial = b"GET / HTTP/1.1\r\nHost: test\r\nX-Slow: " + b"a" * 64
            served_meanwhile = 0
            for byte in partial:
                try:
                    writer.write(bytes([byte]))
                    await writer.drain()
                    got = await asyncio.wait_for(reader.read(1024), 0.1)
                except TimeoutError:
                    # Meanwhile a normal request on another connection is answered at once.
                    async with session.get(f"http://127.0.0.1:{port}/") as resp:
                        assert resp.status == 200
                    served_meanwhile += 1
                    continue
                except ConnectionResetError:
                    pass
                break
            else:
                pytest.fail(f"the whole head dribbled in over {time.monotonic() - opened:.1f} s and was not cut off")
            lifetime = time.monotonic() - opened
            writer.close()
            assert got == b"", "closed without an answer"
            assert served_meanwhile > 0
            # A lower bound only, so load cannot break it: the dribbler had its whole deadline.
            assert lifetime >= HEADER_TIMEOUT_S - 0.2, lifetime

    run_on(scenario)


def test_silent_and_idle_connections_are_closed_at_the_header_deadline(run_on: Callable[[Scenario], None]) -> None:
    async def scenario() -> None:
        async with serving() as (runner, port):
            # Silent from the start.
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            assert await closed_by_server(reader)
            writer.close()
            # Idle after an answer (keep-alive), then a second head that never completes.
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(HEAD)
            assert (await read_answer(reader))[0] == 200
            writer.write(b"GET / HTTP/1.1\r\nHost: te")
            assert await closed_by_server(reader)
            writer.close()
            await wait_until(lambda: open_connections(runner) == 0, IO_TIMEOUT_S, "connections to be released")

    run_on(scenario)


def test_tls_listener_serves_https_and_bounds_the_handshake(run_on: Callable[[Scenario], None], tmp_path: Path) -> None:
    async def scenario() -> None:
        certs = make_dev_ca(tmp_path, "localhost")
        async with serving(max_connections=1, ssl_context=server_context(str(certs.cert), str(certs.key))) \
                as (runner, port):
            client_ssl = ssl.create_default_context(cafile=str(certs.ca_cert))
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_ssl)) as session:
                async with session.get(f"https://127.0.0.1:{port}/") as resp:
                    assert resp.status == 200 and await resp.text() == "ok"
                # Past the cap over TLS: the 503 arrives inside TLS.
                reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_ssl,
                                                              server_hostname="localhost")
                writer.write(HEAD)
                assert (await read_answer(reader))[0] == 503
                writer.close()
            # A TCP connection that never starts its handshake is dropped at the header deadline too.
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            assert await closed_by_server(reader)
            writer.close()

    run_on(scenario)


def test_what_aiohttp_answers_itself_is_in_the_one_error_shape(run_on: Callable[[Scenario], None]) -> None:
    async def scenario() -> None:
        async with serving() as (runner, port):
            for raw in (b"FOO / HTTP/1.1\r\nHost: test\r\n\r\n",  # a method the parser refuses
                        b"GET / HTTP/1.1\r\nHost: test\r\nX-Long: " + b"a" * 9000 + b"\r\n\r\n",
                        b"GET / HTTP/1.1\r\nHost: test\r\nContent-Length: nope\r\n\r\n"):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(raw)
                status, headers, body = await read_answer(reader)
                assert status == 400 and headers["content-type"] == "application/json", (raw[:40], body)
                answer = orjson.loads(body)
                assert answer["type"] == "bad_request" and "\n" not in answer["error"], answer
                assert await closed_by_server(reader)
                writer.close()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(HEAD)
            assert (await read_answer(reader))[::2] == (200, b"ok")
            writer.close()

    run_on(scenario)


def test_a_busy_port_is_an_oserror_before_the_app_starts(run_on: Callable[[Scenario], None]) -> None:
    """Checked first: a proxy that cannot listen never starts (never heartbeats an address nobody can reach)."""
    async def scenario() -> None:
        started = asyncio.Event()

        async def resource(app: web.Application) -> AsyncIterator[None]:
            started.set()
            yield

        async with serving() as (_, port):
            app = tiny_app()
            app.cleanup_ctx.append(resource)
            with pytest.raises(OSError):
                await start_server(app, Listener("127.0.0.1", port))
            assert not started.is_set()

    run_on(scenario)


async def refuses_connections(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:  # refused, or reset when the listener closed with it in the backlog
        return True
    writer.close()
    return False


@contextlib.asynccontextmanager
async def draining_for(runner: web.AppRunner, grace_s: float) -> AsyncIterator[asyncio.Task[None]]:
    """``drain(runner, grace_s)`` running in a task; cancelled and the runner cleaned up on the way out."""
    task = asyncio.create_task(drain(runner, grace_s))
    try:
        yield task
    finally:
        task.cancel()
        await runner.cleanup()


async def kept_alive() -> tuple[web.AppRunner, int, asyncio.StreamReader, asyncio.StreamWriter]:
    """A server (header deadline far off) and a connection it answered once and keeps alive."""
    runner = await start_server(tiny_app(), Listener("127.0.0.1", 0, header_timeout_s=IO_TIMEOUT_S))
    port = bound_port(runner)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(HEAD)
    status, headers, _ = await read_answer(reader)
    assert status == 200 and headers.get("connection", "").lower() != "close"
    return runner, port, reader, writer


def test_a_draining_server_serves_what_arrives_on_open_connections_and_tells_them_to_close(
        run_on: Callable[[Scenario], None]) -> None:
    async def scenario() -> None:
        runner, port, reader, writer = await kept_alive()
        async with draining_for(runner, 60) as draining:
            await wait_until(lambda: refuses_connections(port), IO_TIMEOUT_S, "the listener to close")
            # The caller did not see the drain start: its next request goes out on the kept-alive connection.
            writer.write(HEAD)
            status, headers, body = await read_answer(reader)
            assert (status, body) == (200, b"ok")
            assert headers["connection"].lower() == "close"
            assert await closed_by_server(reader)
            # Its one connection gone, the drain ends without waiting out the grace.
            await asyncio.wait_for(draining, IO_TIMEOUT_S)

    run_on(scenario)


def test_a_connection_that_stays_idle_is_closed_when_the_grace_ends(run_on: Callable[[Scenario], None]) -> None:
    async def scenario() -> None:
        runner, _, reader, _ = await kept_alive()
        # A short grace, and a header deadline far beyond it: the grace is what closes the connection.
        async with draining_for(runner, 0.3) as draining:
            assert await closed_by_server(reader)
            await asyncio.wait_for(draining, IO_TIMEOUT_S)

    run_on(scenario)
