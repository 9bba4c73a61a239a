"""shared/logs.py: JSON lines carry the request id of the context they were logged in; settings checked."""
from __future__ import annotations

import asyncio
import io
import logging

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
