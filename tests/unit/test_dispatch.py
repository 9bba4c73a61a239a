"""The dispatcher over a fake proxy client: split, order, retry on an unreachable proxy, hedging."""
from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from typing import Any

import fakeredis.aioredis
import orjson
import pytest

from ingress.costs import CostBook
from ingress.dispatch import Dispatcher
from ingress.proxy_client import ProxyUnreachable
from ingress.registry import Registry
from ingress.view import StateView
from loadtests.common import wait_until
from shared import keys
from shared.errors import ApiError
from shared.messages import ChunkRequest, ChunkResult, VersionSpec

pytestmark = pytest.mark.timeout(10)

SPEC = VersionSpec("acme", "m", "main", 1, "img")
# Bounds every wait on the dispatcher; what is waited for takes milliseconds.
WAIT_S = 5.0


def beat(pid: str, state: str | None = "running") -> dict[str, Any]:
    replicas = [] if state is None else [{"version": SPEC.key, "state": state, "in_flight": 0, "concurrency": 1}]
    return {"proxy_id": pid, "url": f"http://{pid}", "epoch": 1, "ts": time.time(), "replicas": replicas}


class FakeClient:
    """Answers per proxy url: a delay (s), an ``asyncio.Event`` to wait for, or an exception to raise."""

    def __init__(self, behaviour: dict[str, Any]) -> None:
        self.behaviour = behaviour
        self.calls: list[tuple[str, int]] = []
        self.cancelled: list[str] = []

    async def run(self, url: str, chunk: ChunkRequest) -> ChunkResult:
        self.calls.append((url, len(chunk.inputs)))
        what = self.behaviour.get(url, 0.0)
        if isinstance(what, Exception):
            raise what
        try:
            await (what.wait() if isinstance(what, asyncio.Event) else asyncio.sleep(what))
        except asyncio.CancelledError:
            self.cancelled.append(url)
            raise
        return ChunkResult(outputs=[f"{url}:{x}" for x in chunk.inputs], stdout=f"{url} ran {len(chunk.inputs)}\n",
                           timings={"infer_ms": 1.0}, proxy_id=url.removeprefix("http://"))


def dispatcher(client: FakeClient, *beats: dict[str, Any], costs: CostBook | None = None, **kw: Any) -> Dispatcher:
    view = StateView(Registry(fakeredis.aioredis.FakeRedis()))
    view.apply_heartbeats(list(beats))
    view.redis_ok = True
    return Dispatcher(view, client, costs or CostBook(), retries=2, max_age_s=15.0,  # type: ignore[arg-type]
                      rng=random.Random(1), **kw)


async def test_big_batch_split_over_warm_proxies_in_order() -> None:
    client = FakeClient({})
    d = dispatcher(client, beat("a"), beat("b"))
    out = await d.run(SPEC, list(range(200)), time.time() + 5, "r")
    assert [o.rsplit(":", 1)[1] for o in out.outputs] == [str(i) for i in range(200)]
    assert sorted(n for _, n in client.calls) == [100, 100]
    assert sorted(out.proxies) == ["a", "b"]
    assert out.stdout.startswith("[chunk 0] ")


async def test_small_batch_goes_to_one_proxy() -> None:
    client = FakeClient({})
    out = await dispatcher(client, beat("a"), beat("b")).run(SPEC, list(range(10)), time.time() + 5, "r")
    assert len(client.calls) == 1 and len(out.outputs) == 10


async def test_unreachable_proxy_is_retried_elsewhere_and_suspected() -> None:
    client = FakeClient({"http://a": ProxyUnreachable("refused", reached=False)})
    d = dispatcher(client, beat("a"), beat("b", None))
    out = await d.run(SPEC, [1], time.time() + 5, "r")
    assert out.outputs == ["http://b:1"]
    assert [u for u, _ in client.calls] == ["http://a", "http://b"]
    assert "a" not in {p.proxy_id for p in d.view.live_proxies()}


async def test_no_live_proxy_is_503_once_the_deadline_passes() -> None:
    """Held (no proxy may be restarting) within its deadline; then a clear 503, never a hang."""
    with pytest.raises(ApiError) as info:
        await dispatcher(FakeClient({})).run(SPEC, [1], time.time() + 0.5, "r")
    assert info.value.status == 503 and "Retry-After" in info.value.headers


async def test_a_chunk_refused_by_a_restarting_proxy_is_held_until_it_beats_again() -> None:
    """Refused at connect: it never got there, so it is safe to send again once the proxy is back."""

    class Restarting(FakeClient):
        async def run(self, url: str, chunk: ChunkRequest) -> ChunkResult:
            if not self.calls:
                self.calls.append((url, len(chunk.inputs)))
                raise ProxyUnreachable("refused", reached=False)
            return await super().run(url, chunk)

    client = Restarting({})
    d = dispatcher(client, beat("a"))
    call = asyncio.ensure_future(d.run(SPEC, [1], time.time() + WAIT_S, "r"))
    await wait_until(lambda: len(client.calls) == 1, WAIT_S, "the first, refused, attempt")
    assert not call.done()  # held, not failed
    back = beat("a") | {"ts": time.time() + 1}  # the restarted proxy's first heartbeat
    await d.view.registry.redis.set(keys.proxy_heartbeat("a"), orjson.dumps(back))
    await d.view.registry.redis.zadd(keys.PROXIES, {"a": back["ts"]})
    out = await asyncio.wait_for(call, WAIT_S)
    assert out.outputs == ["http://a:1"] and [u for u, _ in client.calls] == ["http://a", "http://a"]


async def test_a_chunk_that_may_have_run_is_not_held_but_failed_at_once() -> None:
    """The proxy took it and died before answering: asked once more (alive, it would answer that chunk id
    from its run), then, with no other proxy, 502 (it is not resent blindly)."""
    client = FakeClient({"http://a": ProxyUnreachable("reset mid-answer", reached=True)})
    with pytest.raises(ApiError) as info:
        await asyncio.wait_for(dispatcher(client, beat("a")).run(SPEC, [1], time.time() + WAIT_S, "r"), WAIT_S)
    assert (info.value.status, info.value.type) == (502, "proxy_unreachable")
    assert len(client.calls) == 2


async def test_a_broken_connection_asks_the_same_proxy_again_with_the_same_chunk_id() -> None:
    """The connection broke after the chunk went out: the proxy may be running it. The same id sent to the
    same proxy joins that run there (runtime_proxy/ledger.py) instead of running the model elsewhere too."""

    class BrokenOnce(FakeClient):
        ids: list[str] = []

        async def run(self, url: str, chunk: ChunkRequest) -> ChunkResult:
            self.ids.append(chunk.chunk_id)
            if len(self.ids) == 1:
                self.calls.append((url, len(chunk.inputs)))
                raise ProxyUnreachable("reset mid-answer", reached=True)
            return await super().run(url, chunk)

    client = BrokenOnce({})
    out = await dispatcher(client, beat("a"), beat("b")).run(SPEC, [1], time.time() + WAIT_S, "r")
    first = client.calls[0][0]
    assert [u for u, _ in client.calls] == [first, first] and out.outputs == [f"{first}:1"]
    assert client.ids[0] == client.ids[1] and client.ids[0]


async def test_every_chunk_of_a_request_has_its_own_id_and_requests_never_share_one() -> None:
    client = FakeClient({})
    seen: list[str] = []
    original = client.run

    async def run(url: str, chunk: ChunkRequest) -> ChunkResult:
        seen.append(chunk.chunk_id)
        return await original(url, chunk)

    client.run = run  # type: ignore[method-assign]
    d = dispatcher(client, beat("a"), beat("b"))
    await d.run(SPEC, list(range(200)), time.time() + 5, "r")
    await d.run(SPEC, list(range(200)), time.time() + 5, "r")  # the same caller's request id again
    assert len(seen) == 4 and len(set(seen)) == 4


async def test_backpressure_past_max_pending_is_503() -> None:
    release = asyncio.Event()
    client = FakeClient({"http://a": release})
    d = dispatcher(client, beat("a"), max_pending=2)
    first = [asyncio.create_task(d.run(SPEC, [i], time.time() + 5, "r")) for i in range(2)]
    try:
        await wait_until(lambda: len(client.calls) == 2, WAIT_S, "both requests to reach the proxy", 0.01)
        with pytest.raises(ApiError) as info:
            await asyncio.wait_for(d.run(SPEC, [9], time.time() + 5, "r"), WAIT_S)
        assert info.value.status == 503 and info.value.headers == {"Retry-After": "1"}
        assert len(client.calls) == 2, "the refused request never reached a proxy"
        release.set()
        assert [(await task).outputs for task in first] == [["http://a:0"], ["http://a:1"]]
    finally:
        for task in first:
            task.cancel()
        await asyncio.gather(*first, return_exceptions=True)
    # Once they are done, the version takes requests again.
    out = await asyncio.wait_for(d.run(SPEC, [9], time.time() + 5, "r"), WAIT_S)
    assert out.outputs == ["http://a:9"]


async def test_straggler_is_hedged_on_a_second_warm_proxy_and_loser_cancelled() -> None:
    costs = CostBook()
    costs.record(SPEC.key, "warm", 0.0, 1.0, 1)  # measured: 1 ms per item
    stuck = asyncio.Event()  # never set: only the hedge can answer
    slow = FakeClient({"http://a": stuck, "http://b": 0.0})
    d = dispatcher(slow, beat("a"), beat("b"), costs=costs, hedge_factor=4.0, hedge_min_ms=20.0)
    d.rng = random.Random(0)
    d.view.proxies["b"] = dataclasses.replace(d.view.proxies["b"], replicas=(
        d.view.proxies["b"].replicas[0].__class__(SPEC.key, "running", 1, 1),))  # b looks busier: a goes first
    out = await asyncio.wait_for(d.run(SPEC, [7], time.time() + 10, "r"), WAIT_S)
    assert out.outputs == ["http://b:7"]
    assert [u for u, _ in slow.calls] == ["http://a", "http://b"]
    assert d.hedges == 1
    await wait_until(lambda: bool(slow.cancelled), WAIT_S, "the losing call to be cancelled", 0.01)
    assert slow.cancelled == ["http://a"]


async def test_no_hedge_before_costs_are_measured() -> None:
    client = FakeClient({"http://a": 0.3})
    d = dispatcher(client, beat("a"), beat("b"), hedge_factor=4.0, hedge_min_ms=20.0)
    await d.run(SPEC, [1], time.time() + 5, "r")
    assert d.hedges == 0 and len(client.calls) == 1


async def test_an_at_most_once_version_is_never_hedged() -> None:
    spec = dataclasses.replace(SPEC, at_most_once=True)
    costs = CostBook()
    costs.record(spec.key, "warm", 0.0, 1.0, 1)
    client = FakeClient({"http://a": 0.3, "http://b": 0.3})
    d = dispatcher(client, beat("a"), beat("b"), costs=costs, hedge_factor=4.0, hedge_min_ms=20.0)
    await asyncio.wait_for(d.run(spec, [1], time.time() + 5, "r"), WAIT_S)
    assert d.hedges == 0 and len(client.calls) == 1


async def test_an_at_most_once_chunk_that_may_have_run_is_not_sent_elsewhere() -> None:
    """Its proxy broke off after taking it (asked again: gone): another proxy could run it a second time."""
    spec = dataclasses.replace(SPEC, at_most_once=True)

    class Dying(FakeClient):
        async def run(self, url: str, chunk: ChunkRequest) -> ChunkResult:
            self.calls.append((url, len(chunk.inputs)))
            if len(self.calls) == 1:
                raise ProxyUnreachable("reset mid-answer", reached=True)
            raise ProxyUnreachable("refused", reached=False)

    client = Dying({})
    with pytest.raises(ApiError) as info:
        await asyncio.wait_for(dispatcher(client, beat("a"), beat("b")).run(spec, [1], time.time() + 5, "r"), WAIT_S)
    assert (info.value.status, info.value.type) == (502, "proxy_unreachable")
    assert len({u for u, _ in client.calls}) == 1, client.calls


async def test_a_one_chunk_request_ranks_no_cold_host_while_a_warm_slot_is_free_and_none_of_ours_is_in_flight() -> None:
    """The free slot goes first whatever is sampled, so sampling is skipped; with one of this ingress's
    requests in flight the heartbeat's free slot may be taken by it, and cold hosts are ranked again."""
    gate = asyncio.Event()
    client = FakeClient({"http://a": gate})
    d = dispatcher(client, beat("a"), beat("b", None), beat("c", None))
    sampled: list[int] = []
    fleet = d.view.proxies
    sample = fleet.sample
    fleet.sample = lambda *a, **k: sampled.append(1) or sample(*a, **k)  # type: ignore[method-assign]
    first = asyncio.ensure_future(d.run(SPEC, [1], time.time() + 5, "r1"))
    await wait_until(lambda: len(client.calls) == 1, WAIT_S, "the first call")
    assert client.calls == [("http://a", 1)] and sampled == []
    second = asyncio.ensure_future(d.run(SPEC, [2], time.time() + 5, "r2"))
    await wait_until(lambda: len(client.calls) == 2, WAIT_S, "the second call")
    assert sampled == [1]
    gate.set()
    await asyncio.wait_for(asyncio.gather(first, second), WAIT_S)
    big = await d.run(SPEC, list(range(100)), time.time() + 5, "r3")  # split: the cold hosts are ranked
    assert sampled == [1, 1] and len(big.outputs) == 100
