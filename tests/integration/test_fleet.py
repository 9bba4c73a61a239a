"""Several proxies (own ports and ids, one Docker engine) behind ingresses:
batches split and stitched, a proxy SIGKILLed mid-batch, Redis stopped, alias moves.
"""
from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from ingress import state as ingress_state
from ingress.app import build_app as build_ingress
from shared.settings import IngressSettings
from tests.support.stack import ADMIN, SECRET, Stack, free_port, running_stack, wait_until

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
async def fleet(redis_url: str, state_dir: Path, model_image: str) -> AsyncIterator[Stack]:
    async with running_stack(redis_url, state_dir, "docker", proxies=2) as s:
        await s.customer("acme")
        s.image = model_image
        yield s


async def logs(stack: Stack, model: str) -> list[dict]:
    status, body = await stack.admin("GET", f"/api/v1/customers/acme/models/{model}/branches/main/logs?limit=5")
    assert status == 200
    return body["logs"]


async def test_big_batch_is_split_across_proxies_and_stitched_in_order(fleet: Stack) -> None:
    await fleet.deploy("echo", fleet.image, entrypoint="models:echo")
    items = [[f"id-{i}", i] for i in range(1000)]
    status, body, _ = await fleet.call("echo", items)
    assert status == 200, body
    assert body["data"] == [[f"id-{i}", {"echo": i}] for i in range(1000)]
    [record] = await logs(fleet, "echo")
    assert sorted(set(record["proxies"])) == sorted(p.proxy_id for p in fleet.proxies)
    assert "[chunk 0] echo 0" in record["stdout"] and "[chunk 1] echo" in record["stdout"]
    assert record["stdout"].count("\necho") + record["stdout"].count("] echo") == 1000


async def test_proxy_sigkilled_mid_batch_loses_nothing(fleet: Stack) -> None:
    await fleet.deploy("slow", fleet.image, entrypoint="models:slow")
    warm = [[i, 0] for i in range(200)]
    assert (await fleet.call("slow", warm))[0] == 200  # a replica on each proxy
    view = fleet.app[ingress_state.VIEW]
    await wait_until(lambda: all(p.replicas for p in view.live_proxies()) and len(view.live_proxies()) == 2,
                     10, "a warm replica on both proxies")

    call = asyncio.create_task(fleet.call("slow", [[i, 0.004] for i in range(1000)]))
    await wait_until(lambda: sum(1 for p in view.live_proxies() if p.in_flight) == 2, 20,
                     "both proxies working on the batch", 0.02)
    victim = fleet.proxies[1]
    victim.kill()
    status, body, _ = await asyncio.wait_for(call, 60)
    assert status == 200, body
    assert body["data"] == [[i, 0.004] for i in range(1000)]
    [record, *_] = await logs(fleet, "slow")
    assert victim.proxy_id not in record["proxies"], "every chunk answered by a live proxy"


async def test_alias_move_reaches_every_ingress_within_a_second(fleet: Stack) -> None:
    image = fleet.image
    v1 = await fleet.deploy("echo", image, entrypoint="models:echo")
    v2 = await fleet.deploy("echo", image, entrypoint="models:echo")
    assert (await fleet.admin("PUT", "/api/v1/customers/acme/models/echo/branches/main/aliases/prod",
                              {"version": v1}))[0] == 200
    second = await second_ingress(fleet)
    try:
        async def version_on(url: str) -> str:
            async with aiohttp.ClientSession() as s, s.post(
                url + "/v1/echo/prod", json={"data": 1},
                headers={"Authorization": fleet.key, "Host": "acme.localhost"}) as r:
                assert r.status == 200
                return r.headers["X-Model-Version"]

        assert await version_on(second[1]) == str(v1)
        status, body = await fleet.admin("PUT", "/api/v1/customers/acme/models/echo/branches/main/aliases/prod",
                                         {"version": v2})
        assert status == 200 and body == {"alias": "prod", "version": v2}
        moved = time.monotonic()
        assert await version_on(fleet.url) == str(v2), "the ingress that moved it sees it at once"
        await wait_until(lambda: _view_points_to(second[0], v2), 1.0, "the alias move on the second ingress", 0.005)
        assert time.monotonic() - moved < 1.0
        assert await version_on(second[1]) == str(v2)
        status, _ = await fleet.admin("DELETE", "/api/v1/customers/acme/models/echo/branches/main/aliases/prod")
        assert status == 204
        await wait_until(lambda: "prod" not in second[0].app[ingress_state.VIEW].pointers.get("acme/echo/main", {}),
                         1.0, "the alias removal on the second ingress", 0.005)
    finally:
        await second[0].cleanup()


def _view_points_to(runner: web.AppRunner, version: int) -> bool:
    return runner.app[ingress_state.VIEW].pointers.get("acme/echo/main", {}).get("prod") == version


async def second_ingress(stack: Stack) -> tuple[web.AppRunner, str]:
    port = free_port()
    runner = web.AppRunner(build_ingress(IngressSettings(
        redis_url=stack.redis_url, admin_token=ADMIN, proxy_secret=SECRET, ingress_host="127.0.0.1",
        ingress_port=port, view_poll_interval_s=5.0)))  # slow poll: only the pub/sub event can make it in time
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"


@pytest.fixture
async def own_redis(redis_server: str, tmp_path: Path) -> AsyncIterator[tuple[str, subprocess.Popen[bytes], int]]:
    """A redis-server of this test's own (persistent, as in production), so it can be stopped
    and started again without harming others."""
    port = free_port()
    server = shutil.which("redis-server")
    assert server, "redis-server is installed wherever redis_server answers"
    args = [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
            "--appendfsync", "always", "--dir", str(tmp_path)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    holder = {"proc": proc}

    async def up() -> bool:
        return subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True, text=True,
                              timeout=5).stdout.strip() == "PONG"

    await wait_until(up, 10, "the test's redis-server")
    yield url, proc, port
    for p in (holder["proc"],):
        p.terminate()
        p.wait(timeout=10)


async def test_redis_stopped_for_30s_warm_calls_keep_answering(
    own_redis: tuple[str, subprocess.Popen[bytes], int], state_dir: Path, model_image: str,
) -> None:
    url, redis_proc, port = own_redis
    async with running_stack(url, state_dir, "docker", proxies=2) as stack:
        await stack.customer("acme")
        await stack.deploy("echo", model_image, entrypoint="models:echo")
        assert (await stack.call("echo", [[i, i] for i in range(200)]))[0] == 200  # warm on both
        assert (await stack.request("GET", "/readyz"))[0] == 200

        redis_proc.terminate()
        redis_proc.wait(timeout=10)
        down_at = time.monotonic()
        answered = 0
        while time.monotonic() - down_at < 30:
            status, body, _ = await stack.call("echo", answered, timeout_s=10)
            assert status == 200 and body == {"data": {"echo": answered}}, body
            answered += 1
            await asyncio.sleep(0.25)  # pacing the load, not synchronising
        status, ready, _ = await stack.request("GET", "/readyz")
        assert status == 503 and ready["type"] == "degraded" and ready["redis"] is False

        restarted = subprocess.Popen(redis_proc.args, stdout=subprocess.DEVNULL)  # type: ignore[arg-type]
        try:
            async def ready_again() -> bool:
                return (await stack.request("GET", "/readyz"))[0] == 200

            await wait_until(ready_again, 20, "/readyz to recover once Redis is back", 0.1)
            assert (await stack.call("echo", "after"))[0] == 200
        finally:
            restarted.terminate()
            restarted.wait(timeout=10)
    assert answered > 60
