"""The inference route is served by the listener's lean server on plain HTTP and by aiohttp's router with TLS
(and on a connection whose first request was another route). Both must give the same answers: the same
status, error shape, headers and data, for good calls and for every kind of bad one."""
from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest

from tests.faults.test_proxy_restart import MODELS
from tests.security.fuzz_strategies import Request, Response, parse_response
from tests.support.stack import running_stack

pytestmark = [pytest.mark.timeout(120)]
IO_TIMEOUT_S = 30.0
# What differs between two answers by nature: the time, the framing, the server's name, the timings.
VARYING = {"date", "server", "connection", "content-length", "server-timing", "x-request-id"}


async def _exchange(port: int, request: Request, via_aiohttp: bool) -> Response:
    """``request`` on a fresh connection; with ``via_aiohttp`` the connection's first request is another route,
    which hands it to aiohttp's handler for good."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=2**22)
    try:
        async with asyncio.timeout(IO_TIMEOUT_S):
            if via_aiohttp:
                writer.write(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length:")))
                await reader.readexactly(length)
            writer.write(request.wire())
            return parse_response(await reader.read())
    finally:
        writer.close()


def _call(key: str, target: str, body: bytes | None = b'{"data": 7}', host: str = "acme.localhost",
          **headers: str) -> Request:
    sent = [(b"Host", host.encode()), (b"Authorization", f"Bearer {key}".encode())] + \
        [(name.replace("_", "-").encode(), value.encode()) for name, value in headers.items()]
    return Request(b"POST", target.encode(), tuple(sent), body)


async def test_the_lean_and_the_aiohttp_route_answer_alike(redis_url: str, state_dir: Path) -> None:
    async with running_stack(redis_url, state_dir, "process") as stack:
        key = await stack.customer("acme")
        other = await stack.customer("globex")
        await stack.deploy("echo", MODELS, "models:echo")
        await stack.deploy("echo", MODELS, "models:echo", branch="feat~x")
        cases = {
            "a call": _call(key, "/v1/echo/latest"),
            "a version number and a query": _call(key, "/v1/echo/1?x=y"),
            "a branch with a slash": _call(key, "/v1/echo/feat~x/latest"),
            "a percent-encoded name": _call(key, "/v1/ech%6F/latest"),
            "a batch": _call(key, "/v1/echo/latest", b'{"data": [[0, 1], [1, 2]]}'),
            "the caller's request id": _call(key, "/v1/echo/latest", X_Request_Id="mine-1"),
            "a batch-priority call": _call(key, "/v1/echo/latest", X_Lukewarm_Priority="batch"),
            "a model that raises": _call(key, "/v1/echo/latest", b'{"data": "raise"}'),
            "no key": Request(b"POST", b"/v1/echo/latest", ((b"Host", b"acme.localhost"),), b'{"data": 1}'),
            "another customer's key": _call(other, "/v1/echo/latest"),
            "no customer in the Host": _call(key, "/v1/echo/latest", host="localhost"),
            "an unknown model": _call(key, "/v1/nope/latest"),
            "an unknown version": _call(key, "/v1/echo/99"),
            "a bad version": _call(key, "/v1/echo/0x1"),
            "a bad name": _call(key, "/v1/ec%20ho/latest"),
            "invalid UTF-8 in a name": _call(key, "/v1/ech%FF/latest"),
            "an encoded slash in a branch": _call(key, "/v1/echo/feat%2Fx/latest"),
            "an encoded slash in a name": _call(key, "/v1/ec%2Fho/latest"),
            "a dot segment": _call(key, "/v1/echo/../latest"),
            "too many segments": _call(key, "/v1/echo/main/1/2"),
            "too few segments": _call(key, "/v1/echo"),
            "an empty segment": _call(key, "/v1//latest"),
            "no body": _call(key, "/v1/echo/latest", None),
            "not JSON": _call(key, "/v1/echo/latest", b"{nope"),
            "nested too deep": _call(key, "/v1/echo/latest", b'{"data": ' + b"[" * 300 + b"]" * 300 + b"}"),
            "no data field": _call(key, "/v1/echo/latest", b'{"x": 1}'),
            "a bad priority": _call(key, "/v1/echo/latest", X_Lukewarm_Priority="urgent"),
            "a bad request id": _call(key, "/v1/echo/latest", X_Request_Id="has space"),
            # Two keys: the first counts on both paths (aiohttp's CIMultiDict.get), whatever the names' case.
            "a good key, then a bad one": _call(key, "/v1/echo/latest", authorization="Bearer lw_nope"),
            "a bad key, then a good one": Request(b"POST", b"/v1/echo/latest", (
                (b"Host", b"acme.localhost"), (b"authorization", b"Bearer lw_nope"),
                (b"Authorization", f"Bearer {key}".encode())), b'{"data": 7}'),
        }
        for name, request in cases.items():
            lean = await _exchange(stack.port, request, via_aiohttp=False)
            other_path = await _exchange(stack.port, request, via_aiohttp=True)
            assert lean.status == other_path.status, (name, lean, other_path)
            assert lean.json() == other_path.json(), (name, lean, other_path)
            assert {k: v for k, v in lean.headers.items() if k not in VARYING} == \
                {k: v for k, v in other_path.headers.items() if k not in VARYING}, name
            assert set(lean.headers) - {"server"} == set(other_path.headers) - {"server"}, name
            if lean.status == 200:
                assert "start;desc=" in lean.headers["server-timing"], name
            if name == "the caller's request id":
                assert lean.headers["x-request-id"] == other_path.headers["x-request-id"] == "mine-1"
        # The cases above mean what they say (not two paths agreeing on one wrong answer).
        expected = {"a call": 200, "a percent-encoded name": 200, "a branch with a slash": 200, "no key": 401,
                    "another customer's key": 403, "no customer in the Host": 400, "an unknown model": 404,
                    "too many segments": 404, "an empty segment": 404, "not JSON": 400, "a bad name": 400,
                    "invalid UTF-8 in a name": 400, "nested too deep": 400, "a bad priority": 400,
                    "a good key, then a bad one": 200, "a bad key, then a good one": 401}
        for name, status in expected.items():
            answer = await _exchange(stack.port, cases[name], via_aiohttp=False)
            assert answer.status == status, (name, answer)
            if status == 200:
                assert orjson.loads(answer.body)["data"] == {"echo": 7}, name
