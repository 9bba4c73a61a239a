"""shared/logs.py: JSON lines carry the request id of the context they were logged in; settings checked."""
from __future__ import annotations

import asyncio
import io
import logging
import time

import orjson
import pytest

from shared import logs


@pytest.fixture
def captured() -> io.StringIO:
    out = io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    logs.setup("INFO", "json")
    root.handlers[0].setStream(out)  # type: ignore[attr-defined]
    yield out
    root.handlers[:], _ = saved
    root.setLevel(saved[1])


async def test_each_request_s_lines_carry_its_own_id(captured: io.StringIO) -> None:
    log = logging.getLogger("lukewarm.test")

    async def handle(request_id: str) -> None:
        logs.REQUEST_ID.set(request_id)
        await asyncio.sleep(0)  # the other request runs in between
        log.info("ran %s", request_id, extra={"version": "acme/m/main/1"})

    await asyncio.gather(asyncio.create_task(handle("a1")), asyncio.create_task(handle("b2")))
    log.warning("no request")
    lines = [orjson.loads(line) for line in captured.getvalue().splitlines()]
    assert [(e["msg"], e.get("request_id")) for e in lines] == [("ran a1", "a1"), ("ran b2", "b2"),
                                                               ("no request", None)]
    assert lines[0]["level"] == "INFO" and lines[0]["version"] == "acme/m/main/1" and lines[0]["time"].endswith("Z")


def test_a_traceback_is_one_field_and_long_messages_are_cut(captured: io.StringIO) -> None:
    log = logging.getLogger("lukewarm.test")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    log.info("x" * (logs.MAX_FIELD_CHARS + 100))
    first, second = (orjson.loads(line) for line in captured.getvalue().splitlines())
    assert "ValueError: boom" in first["exc"]
    assert len(second["msg"]) == logs.MAX_FIELD_CHARS + 1


@pytest.mark.parametrize(("level", "fmt"), [("LOUD", "text"), ("INFO", "xml")])
def test_bad_settings_are_a_one_line_exit(level: str, fmt: str) -> None:
    with pytest.raises(SystemExit):
        logs.setup(level, fmt)


# ---- access lines in batches ---------------------------------------------------------------------


async def test_access_lines_are_written_after_the_batch_delay_with_their_own_time_and_request_id(
        captured: io.StringIO) -> None:
    batch = logs.AccessLog(logging.getLogger("test.access"), flush_after_s=0.05)

    async def request(request_id: str) -> None:
        logs.REQUEST_ID.set(request_id)
        batch.add(f"POST /v1/m/latest 200 id={request_id}")

    added_at = time.time()
    await asyncio.gather(asyncio.create_task(request("a1")), asyncio.create_task(request("")))
    assert captured.getvalue() == ""  # not yet: they wait for the batch
    logs.REQUEST_ID.set("caller")  # what the flush's own context holds must not leak into the lines
    batch.add("GET /healthz 200")
    logs.REQUEST_ID.set("")

    async def written() -> bool:
        return len(captured.getvalue().splitlines()) == 3

    for _ in range(200):  # bounded: at most 2 s for a 50 ms batch
        if await written():
            break
        await asyncio.sleep(0.01)
    lines = [orjson.loads(line) for line in captured.getvalue().splitlines()]
    assert [(e["msg"], e.get("request_id")) for e in lines] == [
        ("POST /v1/m/latest 200 id=a1", "a1"), ("POST /v1/m/latest 200 id=", None), ("GET /healthz 200", "caller")]
    assert all(e["logger"] == "test.access" and e["level"] == "INFO" for e in lines)
    assert all(abs(e["ts"] - added_at) < 0.04 for e in lines)  # the time it was added, not written


def test_access_lines_are_written_at_once_past_the_batch_bound_or_outside_a_loop(captured: io.StringIO) -> None:
    batch = logs.AccessLog(logging.getLogger("test.access"), max_pending=3)
    for n in range(2):
        batch.add(f"line {n}")  # no running loop: written at once
    assert len(captured.getvalue().splitlines()) == 2

    async def burst() -> int:
        for n in range(3):
            batch.add(f"burst {n}")
        return len(captured.getvalue().splitlines())

    assert asyncio.run(burst()) == 5  # the third filled the batch: written without waiting for the timer
    batch.flush()  # nothing pending: nothing more
    assert len(captured.getvalue().splitlines()) == 5


def test_batched_aiohttp_lines_equal_aiohttps_own(captured: io.StringIO) -> None:
    from aiohttp import web
    from aiohttp.test_utils import make_mocked_request
    from aiohttp.web_log import AccessLogger

    from shared.serving import BatchedAccessLogger

    request = make_mocked_request("POST", "/v1/echo/latest?x=%20y", headers={"User-Agent": "curl/8"})
    response = web.Response(body=b'{"data": 1}', headers={"X-Request-Id": "r-9"})
    response._body_length = 11  # noqa: SLF001 - what writing it would have set
    AccessLogger(logging.getLogger("test.aiohttp"), logs.ACCESS_LOG_FORMAT).log(request, response, 0.0123)
    batched = BatchedAccessLogger(logging.getLogger("test.batched"), logs.ACCESS_LOG_FORMAT)
    assert batched.enabled
    batched.log(request, response, 0.0123)
    logs.AccessLog.of(logging.getLogger("test.batched")).flush()
    own, ours = (orjson.loads(line) for line in captured.getvalue().splitlines())
    assert own["msg"] == ours["msg"] == '- "POST /v1/echo/latest?x=%20y HTTP/1.1" 200 11 0.012300 "curl/8" request_id=r-9'
    assert {k: v for k, v in own.items() if k not in ("ts", "time", "logger")} == \
        {k: v for k, v in ours.items() if k not in ("ts", "time", "logger")}


def test_a_batch_pending_when_its_loop_closed_is_written_by_the_next_loop(captured: io.StringIO) -> None:
    batch = logs.AccessLog(logging.getLogger("test.access"), flush_after_s=0.01)

    async def add(line: str) -> None:
        batch.add(line)

    asyncio.run(add("first"))  # its loop closes before the timer fires
    assert captured.getvalue() == ""

    async def add_and_wait() -> None:
        batch.add("second")
        for _ in range(200):  # bounded: 2 s for a 10 ms batch
            if len(captured.getvalue().splitlines()) == 2:
                return
            await asyncio.sleep(0.01)

    asyncio.run(add_and_wait())
    assert [orjson.loads(line)["msg"] for line in captured.getvalue().splitlines()] == ["first", "second"]
