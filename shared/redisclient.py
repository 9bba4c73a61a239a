"""The one way the daemons open Redis: bounded, and sending nothing a least-privilege ACL must allow.

redis-py announces itself on connect (CLIENT SETINFO, CLIENT MAINT_NOTIFICATIONS); allowing those
in an ACL means allowing all of CLIENT (KILL, LIST). Switched off, a connection sends HELLO,
SELECT and the commands of deploy/redis-acl.conf only. ``rediss://``, a password and an ACL user
come in the URL.
"""
from __future__ import annotations

import redis.asyncio as redis
from redis.maint_notifications import MaintNotificationsConfig


def connect(url: str, timeout_s: float, read_timeout: bool = True, health_check_s: int = 0) -> redis.Redis:
    """A client for ``url``; ``read_timeout`` off for pub/sub, whose reads block by design."""
    return redis.Redis.from_url(
        url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s if read_timeout else None,
        health_check_interval=health_check_s,
        driver_info=None, maint_notifications_config=MaintNotificationsConfig(enabled=False),
    )
