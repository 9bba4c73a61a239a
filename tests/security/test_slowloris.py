"""Slow-loris against the real ingress: 200 connections dribbling a request head a byte a second,
reopened as the server closes them, while normal calls go on. Every normal call is answered 200 and
every slow connection is closed by the server at the header deadline, without an answer.

Latency is printed (p99 with and without the slow connections), never asserted: speed is what
``python -m loadtests.slowloris`` measures.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from loadtests.common import p50, p99
from loadtests.slowloris import SlowLoris, slow_head, timed_calls
from tests.support.stack import MODELS_DIR, Stack

pytestmark = [pytest.mark.security, pytest.mark.timeout(300)]

HEADER_TIMEOUT_S = 2.0
SLOW_CONNECTIONS = 200
# Scheduling slack on a loaded machine (the ingress, the attack and the calls share one loop).
MARGIN_S = 1.5
CALL_TIMEOUT_S = 10.0
PHASE_TIMEOUT_S = 90.0


@pytest.fixture
async def stack(redis_url: str, state_dir: Path) -> AsyncIterator[Stack]:
    s = Stack(redis_url, state_dir, "process")
    try:
        await s.add_proxy()
        await s.start_ingress(header_timeout_s=HEADER_TIMEOUT_S, max_connections=1000)
        await s.wait_for_proxies(1)
        await s.customer("acme")
        await s.deploy("echo", f"dir:{MODELS_DIR}", entrypoint="models:echo")
        status, body, _ = await s.call("echo", "warm")
        assert status == 200, body
        yield s
    finally:
        await s.close()


async def test_slow_connections_are_cut_off_while_normal_calls_answer(stack: Stack) -> None:
    # Each phase is bounded as a whole (each call alone is too): a stuck stack fails here, saying where.
    async with asyncio.timeout(PHASE_TIMEOUT_S):
        quiet, quiet_statuses = await timed_calls(stack, "echo", 100, call_timeout_s=CALL_TIMEOUT_S)
    async with SlowLoris("127.0.0.1", stack.port, SLOW_CONNECTIONS, slow_head("acme.localhost")) as attack:
        async with asyncio.timeout(PHASE_TIMEOUT_S):
            # Long enough for every slow connection to be cut off, reopened and cut off again.
            loud, loud_statuses = await timed_calls(stack, "echo", 100, min_s=3 * HEADER_TIMEOUT_S,
                                                    call_timeout_s=CALL_TIMEOUT_S)
    stats = attack.stats
    print(f"\nnormal calls: without slow connections p50 {p50(quiet):.2f} ms p99 {p99(quiet):.2f} ms (n={len(quiet)}); "
          f"with {SLOW_CONNECTIONS} p50 {p50(loud):.2f} ms p99 {p99(loud):.2f} ms (n={len(loud)})")
    print(f"slow connections: opened {stats.opened}, closed by the server {len(stats.lifetimes_s)}, "
          f"lifetime max {max(stats.lifetimes_s, default=0):.2f} s, answered {stats.answered}")

    assert dict(quiet_statuses) == {200: len(quiet)}
    assert dict(loud_statuses) == {200: len(loud)}
    assert stats.answered == 0, "a partial head gets no answer, only a close"
    assert stats.connect_errors == 0
    assert len(stats.lifetimes_s) >= SLOW_CONNECTIONS, "every slow connection was closed by the server"
    assert max(stats.lifetimes_s) <= HEADER_TIMEOUT_S + MARGIN_S, sorted(stats.lifetimes_s)[-5:]
    # Closed by the deadline, not by anything sooner (the head was still arriving, a byte a second).
    assert min(stats.lifetimes_s) >= HEADER_TIMEOUT_S - 0.5, sorted(stats.lifetimes_s)[:5]
