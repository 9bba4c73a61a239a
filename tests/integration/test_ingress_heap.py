"""The ingress runs the heap keeper (shared/heap.py): while it serves, the collector makes no automatic full
pass and takes the middle generation every third young pass; when it stops, the thresholds come back."""
from __future__ import annotations

import gc

import pytest
from aiohttp import web

from ingress.app import build_app
from shared import heap
from shared.settings import IngressSettings
from tests.support.stack import ADMIN, SECRET, free_port

pytestmark = pytest.mark.timeout(60)


async def test_the_ingress_keeps_the_heap_while_it_runs_and_restores_it_when_it_stops(redis_url: str) -> None:
    before = gc.get_threshold()
    port = free_port()
    runner = web.AppRunner(build_app(IngressSettings(
        redis_url=redis_url, admin_token=ADMIN, proxy_secret=SECRET, ingress_host="127.0.0.1", ingress_port=port,
        gc_full_every_s=3600)))
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", port).start()
        assert gc.get_threshold() == (before[0], heap.YOUNG_PASSES_PER_MIDDLE, heap.NO_AUTOMATIC_FULL)
    finally:
        await runner.cleanup()
    assert gc.get_threshold() == before
    assert heap._installs == 0
