"""Faults: runtime proxies restart (an upgrade), are killed, or drain while calls come in; nothing is lost."""
from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest

from ingress import state
from loadtests.traffic import Traffic
from tests.support.stack import REPO_ROOT, ProxyProcess, Stack, running_stack, wait_until

pytestmark = [pytest.mark.timeout(180)]

MODELS = f"dir:{REPO_ROOT / 'tests' / 'support' / 'models'}"


async def test_calls_during_a_proxy_restart_are_held_and_answered(redis_url: str, state_dir: Path) -> None:
    async with running_stack(redis_url, state_dir, "process") as stack:
        await stack.customer("acme")
        await stack.deploy("echo", MODELS, "models:echo")
        assert (await stack.call("echo", 0))[0] == 200
        proxy = stack.proxies[0]
        proxy.stop()  # SIGTERM: it withdraws its heartbeat and stops listening
        calls = [asyncio.ensure_future(stack.call("echo", i, extra={"timeout_seconds": 60}, timeout_s=90))
                 for i in range(5)]
        dispatcher = stack.app[state.DISPATCHER]
        await wait_until(lambda: dispatcher.pending("acme/echo/main/1") == 5, 15, "the five calls held")
        assert not any(c.done() for c in calls)
        await proxy.start()
        answers = await asyncio.wait_for(asyncio.gather(*calls), 90)
        assert [(status, body) for status, body, _ in answers] == [(200, {"data": {"echo": i}}) for i in range(5)]


async def test_with_no_proxy_back_before_the_deadline_the_answer_is_503(redis_url: str, state_dir: Path) -> None:
    async with running_stack(redis_url, state_dir, "process") as stack:
        await stack.customer("acme")
        await stack.deploy("echo", MODELS, "models:echo")
        stack.proxies[0].stop()
        await wait_until(lambda: not stack.app[state.VIEW].live_proxies(), 15, "the stopped proxy to leave the view")
        # Held for its 2 s deadline, then answered: a client that waits 10 s gets the 503 (no hang).
        status, body, headers = await stack.call("echo", 1, extra={"timeout_seconds": 2}, timeout_s=10)
        assert (status, body["type"]) == (503, "unavailable") and int(headers["Retry-After"]) >= 1, body


def echo_traffic(stack: Stack, callers: int = 4, timeout_s: int = 30, rate_per_s: float = 40.0) -> Traffic:
    """Steady calls through the stack's ingress, each answer checked against what echo must answer."""
    return Traffic([stack.url], stack.call_headers(), "/v1/echo/latest",
                   lambda n: {"data": n, "timeout_seconds": timeout_s}, callers=callers, timeout_s=timeout_s + 10,
                   rate_per_s=rate_per_s, expected=lambda n, body: body == {"data": {"echo": n}})


async def test_a_proxy_killed_and_restarted_under_load_loses_nothing(redis_url: str, state_dir: Path) -> None:
    """SIGKILL (no drain, no withdrawn heartbeat): calls on it fail clearly or move to the other proxy."""
    async with running_stack(redis_url, state_dir, "process", proxies=2) as stack:
        await stack.customer("acme")
        await stack.deploy("echo", MODELS, "models:echo", capacity={"min": 0, "max": 2})
        assert (await stack.call("echo", 0))[0] == 200
        async with echo_traffic(stack) as traffic:
            await wait_until(lambda: traffic.tally.ok >= 20, 30, "calls flowing")
            victim = stack.proxies[0]
            victim.kill()
            seen = traffic.tally.sent
            await wait_until(lambda: traffic.tally.ok >= seen + 20, 30, "calls flowing without it")
            await victim.start()
            await stack.wait_for_proxies(2)
            seen = traffic.tally.ok
            await wait_until(lambda: traffic.tally.ok >= seen + 20, 30, "calls flowing after its restart")
        tally = traffic.tally
        assert tally.lost == 0, tally.lost_examples
        assert tally.ok >= 60 and tally.sent == tally.ok + tally.clear_errors


async def test_sigterm_drains_a_proxy_its_chunk_in_flight_finishes(redis_url: str, state_dir: Path) -> None:
    """A stopping proxy leaves the fleet at once, takes no new chunk, and finishes the one it runs."""
    async with running_stack(redis_url, state_dir, "process", proxies=2) as stack:
        await stack.customer("acme")
        await stack.deploy("slow", MODELS, "models:slow", capacity={"min": 0, "max": 2})
        assert (await stack.call("slow", 0))[0] == 200
        view = stack.app[state.VIEW]
        slow = asyncio.ensure_future(stack.call("slow", 2.0, extra={"timeout_seconds": 30}, timeout_s=40))
        running: list[ProxyProcess] = []

        async def running_somewhere() -> bool:
            assert stack.session is not None
            running[:] = [p for p in stack.proxies
                          if any(r["in_flight"] for r in (await p.state(stack.session))["replicas"])]  # type: ignore[index]
            return bool(running)

        await wait_until(running_somewhere, 20, "the slow call to run on a proxy")
        victim = running[0]
        assert victim.proc is not None
        victim.proc.send_signal(signal.SIGTERM)
        await wait_until(lambda: victim.proxy_id not in view.proxies, 10, "the draining proxy to leave the view")
        status, body, _ = await stack.call("slow", 0, extra={"timeout_seconds": 30}, timeout_s=40)
        assert status == 200, body  # on the other proxy
        assert (await asyncio.wait_for(slow, 40))[:2] == (200, {"data": 2.0})
        assert victim.proc.wait(timeout=30) == 0
        assert "draining requests in flight" in victim.log()
