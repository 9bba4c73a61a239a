"""Several hosts on one machine: each proxy binds and advertises its own loopback address (127.0.0.2,
127.0.0.3) with its own state; the ingress routes by what each advertises. A proxy that cannot bind
what it is told exits at once with one line."""
from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from ingress import state
from shared import keys
from tests.faults.test_proxy_restart import MODELS
from tests.support.stack import REPO_ROOT, SECRET, running_stack, wait_until

pytestmark = [pytest.mark.timeout(120)]


def answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


async def test_proxies_on_their_own_addresses_share_a_big_batch(redis_url: str, state_dir: Path) -> None:
    async with running_stack(redis_url, state_dir, "process", proxies=2) as stack:
        view = stack.app[state.VIEW]
        hosts = sorted(p.host for p in stack.proxies)
        assert hosts == ["127.0.0.2", "127.0.0.3"]
        assert sorted(view.proxies[p.proxy_id].url for p in stack.proxies) == sorted(p.url for p in stack.proxies)
        for proxy in stack.proxies:
            assert answers(proxy.host, proxy.port) and not answers("127.0.0.1", proxy.port)
            assert proxy.state_dir.is_dir() and proxy.state_dir.name == proxy.proxy_id
        await stack.customer("acme")
        await stack.deploy("double", MODELS, "models:double_batch", batch_size=8, capacity={"min": 2, "max": 2})
        await wait_until(lambda: all(any(r.state == "running" for r in view.proxies[p.proxy_id].replicas)
                                     for p in stack.proxies), 30, "a running replica on each host")
        status, body, _ = await stack.call("double", [[i, i] for i in range(400)])
        assert status == 200 and body["data"] == [[i, 2 * i] for i in range(400)]
        # aiohttp logs a request once its answer is sent: each host's line may come a moment after ours.
        await wait_until(lambda: all("POST /internal/v1/chunks" in p.log() for p in stack.proxies), 10,
                         "each host to have run a part of the batch")


@pytest.mark.parametrize(("env", "says"), [
    ({"LUKEWARM_PROXY_HOST": "10.254.254.254", "LUKEWARM_ADVERTISE_URL": "http://10.254.254.254:8081"},
     "cannot listen on 10.254.254.254"),
    ({"LUKEWARM_PROXY_HOST": "0.0.0.0"}, "set LUKEWARM_ADVERTISE_URL"),
    ({"LUKEWARM_PROXY_HOST": "0.0.0.0", "LUKEWARM_ADVERTISE_URL": "10.0.0.5:8081"}, "must look like http://"),
])
def test_a_proxy_that_cannot_bind_or_advertise_what_it_is_told_exits_at_once(
        redis_url: str, tmp_path: Path, env: dict[str, str], says: str) -> None:
    done = subprocess.run([sys.executable, "-m", "runtime_proxy"], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=60, env={"PATH": "/usr/bin:/bin", "LUKEWARM_REDIS_URL": redis_url,
                                           "LUKEWARM_PROXY_SECRET": SECRET, "LUKEWARM_RUNTIME": "process",
                                           "LUKEWARM_STATE_DIR": str(tmp_path), **env})
    assert done.returncode != 0
    assert says in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.zcard(keys.PROXIES) == 0, "it never joined the fleet, not even for a moment"
    finally:
        client.close()
