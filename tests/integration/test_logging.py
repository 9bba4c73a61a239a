"""Logs for real: JSON lines from a proxy carry the caller's request id, lifecycle events are logged,
and what the model printed lands in its container's log tagged with the same id."""
from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.support.stack import running_stack, wait_until

pytestmark = [pytest.mark.timeout(120)]


def json_lines(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        if line.startswith("{"):
            out.append(orjson.loads(line))
    return out


async def test_a_request_id_runs_through_proxy_and_model_logs(redis_url: str, state_dir: Path,
                                                               model_image: str) -> None:
    async with running_stack(redis_url, state_dir, "docker", log_format="json", reaper_interval_s=0.1) as stack:
        await stack.customer("acme")
        await stack.deploy("echo", model_image, "models:echo", idle_timeout_s=0.5)
        headers = {**stack.call_headers(), "X-Request-Id": "trace-7f3a"}
        status, body, answer = await stack.request("POST", "/v1/echo/latest", {"data": "hi"}, headers)
        assert status == 200 and answer["X-Request-Id"] == "trace-7f3a"
        proxy = stack.proxies[0]

        def proxy_lines() -> list[dict[str, Any]]:
            return json_lines(proxy.log())

        # The access line of the chunk is written once its answer went out: poll for it.
        await wait_until(lambda: any(e.get("request_id") == "trace-7f3a" for e in proxy_lines()), 10,
                         "a proxy log line with the request id")
        messages = [e["msg"] for e in proxy_lines()]
        assert any(m.startswith("started replica") and "acme/echo/main/1" in m for m in messages), messages
        await wait_until(lambda: any(e["msg"].startswith("paused replica") for e in proxy_lines()), 20,
                         "the pause to be logged")

        ids = subprocess.run(["docker", "ps", "-aq", "--filter", f"label=lukewarm.proxy={proxy.proxy_id}"],
                             capture_output=True, text=True, timeout=30).stdout.split()
        container_log = subprocess.run(["docker", "logs", ids[0]], capture_output=True, text=True, timeout=30)
        assert "[trace-7f3a] echo 'hi'" in container_log.stdout
        assert "[trace-7f3a] to stderr" in container_log.stderr
