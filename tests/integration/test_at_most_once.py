"""At most once on a proxy, for real: copies of a chunk id share one model call; a cancelled queued chunk never runs.

Chunks are sent the way an ingress sends them (ingress.proxy_client, signed) to a real proxy
subprocess whose replica runs tests/support/models:counted, which answers how many calls its
process has run.
"""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from ingress import state
from ingress.proxy_client import ProxyClient
from shared.messages import ChunkRequest, VersionSpec
from tests.support.stack import REPO_ROOT, SECRET, running_stack, wait_until

pytestmark = [pytest.mark.timeout(120)]

MODELS = f"dir:{REPO_ROOT / 'tests' / 'support' / 'models'}"


def chunk(spec: VersionSpec, seconds: float, chunk_id: str) -> ChunkRequest:
    return ChunkRequest(spec=spec, inputs=[seconds], timeout_s=30.0, request_id="r", chunk_id=chunk_id)


async def test_copies_of_a_chunk_run_the_model_once(redis_url: str, state_dir: Path) -> None:
    async with running_stack(redis_url, state_dir, "process") as stack:
        await stack.customer("acme")
        await stack.deploy("counted", MODELS, "models:counted")
        spec = await stack.app[state.REGISTRY].require_version("acme", "counted", "main", 1)
        url = stack.proxies[0].url
        client = ProxyClient(SECRET, 2.0)
        try:
            assert (await client.run(url, chunk(spec, 0, "warm:0"))).outputs == [1]
            # A copy sent while the first runs (a retry after a broken connection) joins that run.
            first = asyncio.ensure_future(client.run(url, chunk(spec, 1.0, "once:0")))
            second = asyncio.ensure_future(client.run(url, chunk(spec, 1.0, "once:0")))
            answers = await asyncio.wait_for(asyncio.gather(first, second), 30)
            assert [a.outputs for a in answers] == [[2], [2]]
            # One sent after it answered gets the same answer; a new id runs the model again.
            assert (await client.run(url, chunk(spec, 0, "once:0"))).outputs == [2]
            assert (await client.run(url, chunk(spec, 0, "other:0"))).outputs == [3]
        finally:
            client.close()


async def test_a_queued_chunk_whose_caller_hung_up_never_runs(redis_url: str, state_dir: Path) -> None:
    """A lost hedge or a failed request closes its connection: a chunk still waiting for the replica is dropped."""
    async with running_stack(redis_url, state_dir, "process") as stack:
        await stack.customer("acme")
        await stack.deploy("counted", MODELS, "models:counted", capacity={"min": 0, "max": 1})
        spec = await stack.app[state.REGISTRY].require_version("acme", "counted", "main", 1)
        proxy = stack.proxies[0]
        client = ProxyClient(SECRET, 2.0)
        try:
            assert (await client.run(proxy.url, chunk(spec, 0, "warm:0"))).outputs == [1]
            busy = asyncio.ensure_future(client.run(proxy.url, chunk(spec, 1.5, "busy:0")))
            queued = asyncio.ensure_future(client.run(proxy.url, chunk(spec, 0, "queued:0")))

            async def one_waiting() -> bool:
                return sum((await proxy.state(stack.session)).get("waiting", {}).values()) == 1  # type: ignore[arg-type]

            await wait_until(one_waiting, 10, "the second chunk to queue behind the first")
            queued.cancel()  # the caller hangs up
            await asyncio.gather(queued, return_exceptions=True)
            assert (await asyncio.wait_for(busy, 30)).outputs == [2]
            # Had the dropped chunk run, this would be the fourth call.
            assert (await client.run(proxy.url, chunk(spec, 0, "after:0"))).outputs == [3]
        finally:
            client.close()
