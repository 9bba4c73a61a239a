"""The one way the daemons open Redis: bounded, and sending nothing a least-privilege ACL must allow.

redis-py announces itself on connect (CLIENT SETINFO, CLIENT MAINT_NOTIFICATIONS); allowing those
in an ACL means allowing all of CLIENT (KILL, LIST). Switched off, a connection sends HELLO,
SELECT and the commands of deploy/redis-acl.conf only. ``rediss://``, a password and an ACL user
come in the URL.

High availability: a ``redis+sentinel://`` (or ``rediss+sentinel://``) URL names Redis Sentinels
and a service instead of one server (``shared/sentinel_url.py``). The client then asks a Sentinel for
the primary before each new connection (and before each reconnection of a retry:
``FollowingConnection``), so after a failover it reconnects to the new primary:

- a command whose connection the old primary drops (killed, or demoted: Sentinel closes its
  clients then) or leaves unanswered (paused) fails with ``ConnectionError``/``TimeoutError``,
  which redis-py retries (``MASTER_RETRIES``, backing off up to 1 s between tries) on whatever
  primary the Sentinels name by then;
- a write that reaches a demoted primary (``READONLY``) is turned into a ``ConnectionError`` by
  redis-py's ``SentinelManagedConnection`` (it disconnects first), so it is retried on the new
  primary, never surfaced as a permanent ``ReadOnlyError``;
- pub/sub re-subscribes on its new connection (redis-py's own reconnect), like on a plain URL;
  a subscriber still connected to a demoted primary moves when the Sentinels close its connection;
- after a graceful failover (``SENTINEL FAILOVER``) the old primary keeps taking writes until the
  Sentinels demote it, 10 s or more later, and what it took then is gone. So the client asks the
  Sentinels again every ``RECHECK_S`` while it is used (a command waits ``FOLLOW_WAIT_S`` at most
  for the answer) and drops a pooled connection to a primary they no longer name before it is used
  again. A graceful failover still loses what the old primary took between the promotion and the
  clients' next check (about 2 s) unless writes are paused on it first (``CLIENT PAUSE … WRITE``:
  ``loadtests/redis_ha.py``'s ``failover()`` does); a killed primary loses what it had not yet
  sent to its replica (asynchronous replication).

What the retries do not cover (a failover longer than them) reaches the caller as
``redis.ConnectionError``: the same error, and the same handling, as a plain Redis that is down.
While no Sentinel answers, open connections keep working and new ones fail (``MasterNotFoundError``,
a ``ConnectionError``).
"""
from __future__ import annotations

import asyncio
import time
from typing import Any

import redis.asyncio as redis
from redis.asyncio.connection import AbstractConnection, SSLConnection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool, SentinelManagedConnection
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.maint_notifications import MaintNotificationsConfig

from shared.sentinel_url import SentinelUrl, is_sentinel_url, parse_sentinel_url

# The same retry policy redis-py gives a plain ``from_url`` client (10 tries, jittered backoff from
# 10 ms to 1 s): a pool built by Sentinel.master_for would otherwise get none, and a failover's first
# ConnectionError would reach the caller instead of being retried on the new primary.
MASTER_RETRIES = 10
RETRY_BASE_S = 0.01
RETRY_CAP_S = 1.0
# How often a client in use asks the Sentinels whether the primary moved (one SENTINEL MASTERS).
RECHECK_S = 1.0
# How long a command waits for that answer (a Sentinel on the same network answers in about 1 ms).
FOLLOW_WAIT_S = 0.2


def connect(url: str, timeout_s: float, read_timeout: bool = True, health_check_s: int = 0) -> redis.Redis:
    """A client for ``url``; ``read_timeout`` off for pub/sub, whose reads block by design.

    Connects lazily (nothing is sent here). Raises ``ValueError`` for a malformed Sentinel URL.
    """
    if is_sentinel_url(url):
        return _sentinel_client(parse_sentinel_url(url), timeout_s, read_timeout, health_check_s)
    return redis.Redis.from_url(
        url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s if read_timeout else None,
        health_check_interval=health_check_s, **_quiet(),
    )


def _quiet() -> dict[str, Any]:
    """No CLIENT SETINFO, no CLIENT MAINT_NOTIFICATIONS (see the module's docstring)."""
    return {"driver_info": None, "maint_notifications_config": MaintNotificationsConfig(enabled=False)}


# ---- Sentinel -----------------------------------------------------------------------------------


class FollowingConnection(SentinelManagedConnection):
    """redis-py's Sentinel connection, made to ask the Sentinels when it reconnects to retry a command.

    redis-py 8.1 reconnects a dropped connection in ``send_packed_command`` through the base class's
    ``connect_check_health``, to the address it had: a retry after the primary was killed, demoted
    (``READONLY``, turned into ``ConnectionError`` by the base class) or paused would go back to the
    old primary each time, and fail or write where the data is thrown away.
    """

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        if not self.is_connected:
            await self.connect()  # SentinelManagedConnection.connect: the primary the Sentinels name now
        await super().send_packed_command(command, check_health)


class FollowingSSLConnection(FollowingConnection, SSLConnection):
    pass


class FollowingPool(SentinelConnectionPool):
    """redis-py's Sentinel pool, which asks for the primary only when it opens a connection, made to
    follow a primary that moved while its connections stayed open (see the module's docstring)."""

    def __init__(self, service_name: str, sentinel_manager: Sentinel, **kwargs: Any) -> None:
        super().__init__(service_name, sentinel_manager, **kwargs)
        self._asked_at = float("-inf")
        self._asking: asyncio.Task[None] | None = None

    async def get_connection(self, *args: Any, **options: Any) -> AbstractConnection:
        await self._follow(time.monotonic())
        return await super().get_connection(*args, **options)

    async def ensure_connection(self, connection: AbstractConnection) -> None:
        # A connection opened before the primary moved would write to the old one, whose data the
        # Sentinels throw away when they demote it.
        where = (getattr(connection, "host", None), getattr(connection, "port", None))
        if self.master_address is not None and connection.is_connected and where != tuple(self.master_address):
            await connection.disconnect()
        await super().ensure_connection(connection)

    async def _follow(self, now: float) -> None:
        """Ask the Sentinels at most every RECHECK_S, waiting for the answer at most FOLLOW_WAIT_S: a
        slow Sentinel delays a command by no more, and its answer is used when it comes (the task is
        the pool's: ``stop`` ends it)."""
        if now - self._asked_at >= RECHECK_S and (self._asking is None or self._asking.done()):
            self._asked_at = now
            self._asking = asyncio.get_running_loop().create_task(self._ask(), name=f"sentinel-{self.service_name}")
        if self._asking is not None and not self._asking.done():
            await asyncio.wait({self._asking}, timeout=FOLLOW_WAIT_S)

    async def _ask(self) -> None:
        try:
            await self.get_master_address()  # when it moved: records it, drops idle connections
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            pass  # the next connection opened asks again, and fails with the reason

    async def stop(self) -> None:
        task, self._asking = self._asking, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


class SentinelClient(redis.Redis):
    """The primary's client; closing it closes its Sentinel connections too (redis-py leaves them open)."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        pool = self.connection_pool
        try:
            if isinstance(pool, FollowingPool):
                await pool.stop()
            await super().aclose(close_connection_pool)
        finally:
            if isinstance(pool, SentinelConnectionPool):
                await pool.sentinel_manager.aclose()


def _sentinel_client(target: SentinelUrl, timeout_s: float, read_timeout: bool, health_check_s: int) -> redis.Redis:
    shared: dict[str, Any] = {**_quiet()}
    if target.protocol is not None:
        shared["protocol"] = target.protocol
    if target.tls:
        shared.update(ssl=True, **target.tls_options)
    # A Sentinel query never blocks (even for the pub/sub client) and is not retried on the same
    # Sentinel: redis-py moves on to the next one, and the primary's retry asks them all again.
    sentinel_kwargs = {
        **shared, "socket_connect_timeout": timeout_s, "socket_timeout": timeout_s,
        "username": target.sentinel_username, "password": target.sentinel_password,
        "retry": Retry(NoBackoff(), 0),
    }
    sentinel = Sentinel(list(target.sentinels), sentinel_kwargs=sentinel_kwargs)
    client = sentinel.master_for(
        target.service, redis_class=SentinelClient, connection_pool_class=FollowingPool,
        connection_class=FollowingSSLConnection if target.tls else FollowingConnection, db=target.db,
        username=target.username, password=target.password,
        socket_connect_timeout=timeout_s, socket_timeout=timeout_s if read_timeout else None,
        health_check_interval=health_check_s,
        retry=Retry(ExponentialWithJitterBackoff(cap=RETRY_CAP_S, base=RETRY_BASE_S), MASTER_RETRIES),
        **shared,
    )
    assert isinstance(client, redis.Redis)
    return client
