"""Usage and billing on the real stack (process runtime, real Redis): ``GET /api/v1/customers/{c}/usage``
bills what was really sent and what a replica really ran, to its own customer only; ``lukewarm usage``
shows it."""
from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.stack import ADMIN, REPO_ROOT, ProxyProcess, Stack, running_stack, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

IMAGE = f"dir:{REPO_ROOT / 'tests' / 'support' / 'models'}"
USAGE = "/api/v1/customers/{}/usage"
# Ticks and flushes far shorter than the defaults, so the test settles in a fraction of a second;
# the reaper pauses a replica idle for its idle_timeout_s and stops it pause_stop_after_s later.
PROXY: dict[str, Any] = {"reaper_interval_s": 0.05, "usage_tick_s": 0.1, "usage_flush_s": 0.2, "pause_stop_after_s": 4}
INGRESS: dict[str, Any] = {"usage_flush_s": 0.1}
IDLE_TIMEOUT_S = 2
TRAFFIC_S = 4.0


@contextlib.asynccontextmanager
async def usage_stack(redis_url: str, state_dir: Path) -> AsyncIterator[Stack]:
    async with running_stack(redis_url, state_dir, "process", ingress=INGRESS, **PROXY) as stack:
        await stack.customer("acme")
        yield stack


async def get_usage(stack: Stack, customer: str, token: str, query: str = "") -> tuple[int, Any]:
    status, body, _ = await stack.request("GET", USAGE.format(customer) + query, headers={"Authorization": token})
    return status, body


class StateLog:
    """When the one replica of a proxy was first seen running, paused and stopped (polled every 20 ms
    from the proxy's own state endpoint: the wall time the usage must match)."""

    def __init__(self, proxy: ProxyProcess, session: aiohttp.ClientSession) -> None:
        self.proxy = proxy
        self.session = session
        self.seen: dict[str, float] = {}
        self.replicas: set[str] = set()

    async def run(self) -> None:
        while "stopped" not in self.seen:
            for r in (await self.proxy.state(self.session))["replicas"]:
                self.replicas.add(r["replica_id"])
                state = r["state"]
                if state in ("running", "paused", "stopped") and state not in self.seen:
                    self.seen[state] = time.monotonic()
            await asyncio.sleep(0.02)


async def test_usage_bills_requests_errors_and_the_time_a_replica_ran(redis_url: str, state_dir: Path) -> None:
    async with usage_stack(redis_url, state_dir) as stack:
        version = await stack.deploy("echo", IMAGE, "models:echo", idle_timeout_s=IDLE_TIMEOUT_S)
        acme = f"Bearer {ADMIN}"
        assert stack.session is not None
        states = StateLog(stack.proxies[0], stack.session)
        watcher = asyncio.create_task(states.run())
        try:
            # Refused before a version is resolved: not the version's requests.
            assert (await stack.call("nope", 1))[0] == 404
            assert (await stack.call("echo", 1, version="99"))[0] == 404
            assert (await stack.call("echo", 1, key="lw_wrong"))[0] == 401
            bad = await stack.request("POST", "/v1/echo/latest", raw=b"{not json",
                                      headers={"Authorization": stack.key, "Host": "acme.localhost"})
            assert bad[0] == 400
            sent = errors = 0
            deadline = time.monotonic() + TRAFFIC_S
            while time.monotonic() < deadline:
                failing = sent % 4 == 3
                status, body, _ = await stack.call("echo", "raise" if failing else sent)
                assert status == (422 if failing else 200), body
                sent += 1
                errors += failing
                await asyncio.sleep(0.05)
            await asyncio.wait_for(asyncio.shield(watcher), IDLE_TIMEOUT_S + PROXY["pause_stop_after_s"] + 10)
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        assert len(states.replicas) == 1, states.replicas
        running_s = states.seen["paused"] - states.seen["running"]
        paused_s = states.seen["stopped"] - states.seen["paused"]
        assert running_s > TRAFFIC_S and paused_s > 3, states.seen

        final: dict[str, Any] = {}

        async def settled() -> bool:
            """A stopped replica bills nothing more: the figures stay put across a few ticks and flushes."""
            status, body = await get_usage(stack, "acme", acme)
            assert status == 200, body
            same = body["total"] == final.get("total") and body["total"]["paused_seconds"] > 0
            final.clear()
            final.update(body)
            return same

        await wait_until(settled, 10, "the usage to settle once the replica stopped", interval_s=0.5)

        [row] = final["versions"]
        assert (row["model"], row["branch"], row["version"]) == ("echo", "main", version)
        assert (row["requests"], row["errors"]) == (sent, errors)
        assert row["replica_seconds"] == pytest.approx(running_s, rel=0.10), (row, states.seen)
        assert row["paused_seconds"] == pytest.approx(paused_s, rel=0.10), (row, states.seen)
        assert sum(h["requests"] for h in row["hours"]) == sent
        assert final["total"]["requests"] == sent and final["bucket_s"] == 3600 and final["truncated"] is False

        # The customer's own deploy key sees the same; a window given both ways too.
        status, own = await get_usage(stack, "acme", stack.key)
        assert status == 200 and own["versions"] == final["versions"]
        now = time.time()
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now - 7200))
        status, windowed = await get_usage(stack, "acme", stack.key, f"?since={since}&until={int(now) + 3600}")
        assert status == 200 and windowed["versions"] == final["versions"], windowed
        status, before = await get_usage(stack, "acme", stack.key, f"?until={int(now) - 7200}")
        assert status == 200 and before["versions"] == [], before


async def test_usage_is_private_to_its_customer(redis_url: str, state_dir: Path) -> None:
    async with usage_stack(redis_url, state_dir) as stack:
        other = await stack.customer("other")
        _, predict_only = await stack.admin("POST", "/api/v1/customers/acme/keys", {"scopes": ["predict"]})
        await stack.deploy("echo", IMAGE, "models:echo")
        assert (await stack.call("echo", 1))[0] == 200
        for token, status, kind in ((other, 403, "forbidden"), (f"Bearer {other}", 403, "forbidden"),
                                    (predict_only["key"], 403, "forbidden"), ("lw_wrong", 401, "unauthorized"),
                                    ("", 401, "unauthorized")):
            got, body = await get_usage(stack, "acme", token)
            assert (got, body) == (status, {"error": body["error"], "type": kind}), (token, body)
        status, mine = await get_usage(stack, "other", other)
        assert status == 200 and mine["versions"] == [] and mine["total"]["requests"] == 0, mine
        status, body = await get_usage(stack, "nobody", f"Bearer {ADMIN}")
        assert (status, body["type"]) == (404, "not_found")
        for query, message in (("?since=yesterday", "since must be ISO 8601"),
                               ("?since=2024-01-01&until=2023-01-01", "until must be after since"),
                               ("?since=2020-01-01T00:00:00Z&until=2024-01-01T00:00:00Z", "more than 366 days"),
                               ("?until=" + "9" * 50, "too long")):
            status, body = await get_usage(stack, "acme", stack.key, query)
            assert status == 400 and set(body) == {"error", "type"} and message in body["error"], (query, body)


async def cli(*args: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LUKEWARM_")}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "lukewarm.cli", "usage", *args, cwd=REPO_ROOT,
                                                env=env, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_cli_shows_usage_as_a_table_and_refusals_as_one_line(redis_url: str, state_dir: Path) -> None:
    async with usage_stack(redis_url, state_dir) as stack:
        other = await stack.customer("other")
        version = await stack.deploy("echo", IMAGE, "models:echo")
        for data in (1, 2, "raise"):
            await stack.call("echo", data)
        rc, out, err = await cli("--url", stack.url, "--customer", "acme", "--token", stack.key)
        assert rc == 0 and err == "", err
        lines = out.splitlines()
        assert lines[0].startswith("usage of acme from ")
        assert lines[1].split()[:5] == ["MODEL", "BRANCH", "VERSION", "REQUESTS", "ERRORS"]
        assert lines[2].split()[:5] == ["echo", "main", str(version), "3", "1"]
        assert lines[-1].split()[:3] == ["TOTAL", "3", "1"]
        rc, out, err = await cli("--url", stack.url, "--customer", "acme", "--token", stack.key, "--hourly",
                                 "--since", str(int(time.time()) - 3600))
        assert rc == 0 and out.splitlines()[2].split()[3].endswith(":00:00Z"), out

        for args, needle in ((["--token", "lw_wrong"], "401 unauthorized"), (["--token", other], "403 forbidden"),
                             (["--token", stack.key, "--since", "soon"], "400 bad_request"),
                             (["--token", stack.key, "--url", "http://127.0.0.1:1"], "cannot reach")):
            url = [] if "--url" in args else ["--url", stack.url]
            rc, out, err = await cli(*url, "--customer", "acme", *args)
            assert rc != 0 and out == "", (args, out)
            assert len(err.strip().splitlines()) == 1 and needle in err and "Traceback" not in err, (args, err)
