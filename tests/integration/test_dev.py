"""`lukewarm dev` as a new user runs it (what `make run` ends in): it prints a curl
line that answers {"data": …}, and Ctrl-C stops it cleanly, leaving no container.
"""
from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import orjson
import pytest

from tests.support.stack import dev_process, free_port, read_until, stop_dev

pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize("runtime", ["docker", "process"])
def test_dev_prints_a_curl_that_answers_and_stops_cleanly(runtime: str, redis_server: str,
                                                          docker_engine: None, tmp_path: Path) -> None:
    port, proxy_port = free_port(), free_port()
    redis_url = redis_server.rsplit("/", 1)[0] + "/14"
    with dev_process("--port", str(port), "--proxy-port", str(proxy_port), "--redis-url", redis_url,
                     "--runtime", runtime) as proc:
        read_until(proc, "try:", 180)
        curl = read_until(proc, "curl", 10)[-1].strip()
        assert curl.startswith("curl ")
        answer = subprocess.run(shlex.split(curl) + ["--max-time", "60"], capture_output=True, timeout=90)
        assert orjson.loads(answer.stdout) == {"data": {"hello": "world"}}, answer
        stop_dev(proc)
    left = subprocess.run(["docker", "ps", "-aq", "--filter", f"label=lukewarm.proxy=dev-{proxy_port}"],
                          capture_output=True, text=True, timeout=30).stdout.split()
    assert left == [], "Ctrl-C must remove the dev containers"
