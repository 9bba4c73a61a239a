"""Wires the ingress: settings → Redis → local view → dispatcher → routes.

Resources are owned by ``cleanup_ctx`` (set up in order, torn down in
reverse); the view's poll, the events listener, the request-log flusher,
the usage flusher and the capacity loop (ingress/reconciler.py) are owned
background loops.
"""
from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator

import redis.asyncio as redis
from aiohttp import web

from ingress import inference, management, openapi, state
from ingress.admission import CustomerLimiter
from ingress.costs import CostBook
from ingress.dispatch import Dispatcher
from ingress.lease import Lease
from ingress.proxy_client import ProxyClient
from ingress.reconciler import LEASE_NAME, RECONCILER, Reconciler, new_holder_id
from ingress.registry import Registry
from ingress.requestlog import RequestLog
from ingress.usage import USAGE, UsageCounter
from ingress.view import StateView
from shared.background import Periodic, cancel_and_wait
from shared.eventloop import settle_after_startup
from shared.heap import YOUNG_EVERY_S, HeapKeeper
from shared.http import LIMITS, BodyLimits, error_middleware
from shared.hugeheap import FRONTIER_EVERY_S, HeapFrontier
from shared.metrics import IngressMetrics
from shared.redisclient import connect
from shared.settings import IngressSettings

log = logging.getLogger("lukewarm.ingress")

REDIS_TIMEOUT_S = 2.0
# A proxy whose heartbeat is older than this is not routed to.
PROXY_MAX_AGE_S = 15.0


def build_app(settings: IngressSettings) -> web.Application:
    if not settings.proxy_secret:
        raise SystemExit("LUKEWARM_PROXY_SECRET must be set: proxies only answer ingresses that hold it")
    app = web.Application(middlewares=[error_middleware], client_max_size=settings.max_body_mb * 1024 * 1024)
    app[state.SETTINGS] = settings
    app[state.METRICS] = IngressMetrics()
    app[state.LIMITER] = CustomerLimiter(settings.max_inflight_per_customer)
    app[LIMITS] = BodyLimits(timeout_s=settings.body_timeout_s, max_depth=settings.max_json_depth)
    inference.add_routes(app)
    management.add_routes(app)
    openapi.add_routes(app)
    app.cleanup_ctx.append(_resources)
    return app


async def _resources(app: web.Application) -> AsyncIterator[None]:
    settings = app[state.SETTINGS]
    client = connect(settings.redis_url, REDIS_TIMEOUT_S, health_check_s=10)
    # Pub/sub blocks on reads: it gets its own connection without the read timeout.
    events_client = connect(settings.redis_url, REDIS_TIMEOUT_S, read_timeout=False)
    registry = Registry(client)
    view = StateView(registry, max_staleness_s=settings.max_staleness_s, key_cache_s=settings.key_cache_s)
    # A proxy's answer holds the model's (capped at max_response_mb there) re-encoded, and logs.
    proxy_client = ProxyClient(settings.proxy_secret, settings.proxy_connect_timeout_s,
                               max_answer_bytes=(2 * settings.max_response_mb + 1) * 2**20)
    request_log = RequestLog(registry)
    usage = UsageCounter(client)
    app[state.REGISTRY] = registry
    app[state.VIEW] = view
    app[state.REQUEST_LOG] = request_log
    app[USAGE] = usage
    app[state.DISPATCHER] = Dispatcher(
        view, proxy_client, CostBook(),
        retries=settings.chunk_retries, max_age_s=PROXY_MAX_AGE_S, rng=random.Random(),
        max_pending=settings.max_pending_per_version, hedge_factor=settings.hedge_factor,
        hedge_min_ms=settings.hedge_min_ms,
    )
    # The capacity loop: every ingress contends, the lease holder reconciles (shares the measured costs).
    lease = Lease(client, LEASE_NAME, new_holder_id(), settings.lease_ttl_s)
    reconciler = Reconciler(view, registry, proxy_client, app[state.DISPATCHER].costs, lease, settings,
                            max_age_s=PROXY_MAX_AGE_S)
    app[RECONCILER] = reconciler
    poller = Periodic("view-refresh", settings.view_poll_interval_s, view.refresh)
    flusher = Periodic("request-log", 0.5, request_log.flush)
    usage_flusher = Periodic("usage", settings.usage_flush_s, usage.flush)
    heap = HeapKeeper(max(1.0, settings.gc_full_every_s))
    heap_rounds = Periodic("heap", heap.thorough_every_s, heap.run_round)
    young_rounds = Periodic("heap-young", YOUNG_EVERY_S, heap.run_young_round)
    frontier = HeapFrontier()
    frontier_rounds = Periodic("heap-frontier", FRONTIER_EVERY_S, frontier.run_round)
    try:
        await view.refresh()
    except (redis.RedisError, OSError) as exc:
        log.warning("registry unreachable at start (%s); serving once it answers", exc)
    listener = asyncio.create_task(view.listen(events_client, poller.wake), name="view-events")
    poller.start()
    flusher.start()
    usage_flusher.start()
    reconciler.start()
    settle_after_startup()  # fewer and shorter loop stalls from here on (shared/eventloop.py)
    frontier.settle()  # the heap's reserve grown and faulted in now, not by a poll (shared/hugeheap.py)
    heap.install()  # no automatic full collection: heap_rounds runs it (shared/heap.py)
    heap_rounds.start()
    young_rounds.start()
    frontier_rounds.start()
    yield
    await frontier_rounds.stop()
    await young_rounds.stop()
    await heap_rounds.stop()
    heap.uninstall()
    await reconciler.stop()  # first: its warm calls use the proxy client, its lease Redis
    view.stopping = True
    await cancel_and_wait(listener)
    await poller.stop()
    await flusher.stop()
    await request_log.flush()
    await usage_flusher.stop()
    await usage.flush()  # the counts since the last round: a stopping ingress loses none
    proxy_client.close()
    await events_client.aclose()
    await client.aclose()
