"""shared/redisclient.py without a server: Sentinel URLs parsed strictly, clients built as promised."""
from __future__ import annotations

import pytest
import redis.asyncio as redis

from shared.redisclient import FollowingConnection, FollowingPool, FollowingSSLConnection, SentinelClient, connect
from shared.sentinel_url import SentinelUrl, is_sentinel_url, parse_sentinel_url

GOOD = [
    ("redis+sentinel://10.0.0.1:26379,10.0.0.2:26380/lukewarm",
     SentinelUrl(sentinels=(("10.0.0.1", 26379), ("10.0.0.2", 26380)), service="lukewarm")),
    ("redis+sentinel://sentinel-a,sentinel-b.internal/lukewarm/3",
     SentinelUrl(sentinels=(("sentinel-a", 26379), ("sentinel-b.internal", 26379)), service="lukewarm", db=3)),
    ("REDIS+SENTINEL://h:1/svc.main_1-a/0",
     SentinelUrl(sentinels=(("h", 1),), service="svc.main_1-a", db=0)),
    ("redis+sentinel://lukewarm-ingress:p%40ss%3Aw%2Frd@h1:26379/lukewarm/2",
     SentinelUrl(sentinels=(("h1", 26379),), service="lukewarm", db=2, username="lukewarm-ingress",
                 password="p@ss:w/rd")),
    ("redis+sentinel://:secret@h1/lukewarm",
     SentinelUrl(sentinels=(("h1", 26379),), service="lukewarm", password="secret")),
    ("redis+sentinel://[::1]:26379,[fe80::2]/lukewarm",
     SentinelUrl(sentinels=(("::1", 26379), ("fe80::2", 26379)), service="lukewarm")),
    ("redis+sentinel://h1/lukewarm?sentinel_username=watcher&sentinel_password=s%26cret&protocol=2",
     SentinelUrl(sentinels=(("h1", 26379),), service="lukewarm", sentinel_username="watcher",
                 sentinel_password="s&cret", protocol=2)),
    ("redis+sentinel://h1/lukewarm?sentinel_password=x",
     SentinelUrl(sentinels=(("h1", 26379),), service="lukewarm", sentinel_password="x")),
    ("rediss+sentinel://h1:26380/lukewarm/1?ssl_ca_certs=/etc/lukewarm/ca.crt&ssl_cert_reqs=required"
     "&ssl_check_hostname=false",
     SentinelUrl(sentinels=(("h1", 26380),), service="lukewarm", db=1, tls=True,
                 tls_options={"ssl_ca_certs": "/etc/lukewarm/ca.crt", "ssl_cert_reqs": "required",
                              "ssl_check_hostname": False})),
]

BAD = [
    ("redis://h1/0", "scheme"),
    ("redis+sentinel:/h1/lukewarm", "scheme"),
    ("redis+sentinel:///lukewarm", "no Sentinel address"),
    ("redis+sentinel://h1,,h2/lukewarm", "not host:port"),
    ("redis+sentinel://h1:0/lukewarm", "port"),
    ("redis+sentinel://h1:65536/lukewarm", "port"),
    ("redis+sentinel://h1:x/lukewarm", "port"),
    ("redis+sentinel://h1:26379,h1:26379/lukewarm", "listed twice"),
    ("redis+sentinel://h_1/lukewarm", "not host:port"),
    ("redis+sentinel://[::1/lukewarm", "IPv6"),
    ("redis+sentinel://[::1]x/lukewarm", "IPv6"),
    ("redis+sentinel://h1", "path"),
    ("redis+sentinel://h1/", "path"),
    ("redis+sentinel://h1/lukewarm/", "database"),
    ("redis+sentinel://h1/lukewarm/x", "database"),
    ("redis+sentinel://h1/lukewarm/-1", "database"),
    ("redis+sentinel://h1/lukewarm/1/2", "path"),
    ("redis+sentinel://h1/luke warm", "path"),
    ("redis+sentinel://h1/lukewarm#frag", "fragment"),
    ("redis+sentinel://user@h1/lukewarm", "credentials"),
    ("redis+sentinel://user:@h1/lukewarm", "credentials"),
    ("redis+sentinel://h1/lukewarm?socket_timeout=1", "unknown option 'socket_timeout'"),
    ("redis+sentinel://h1/lukewarm?ssl_ca_certs=/ca.crt", "need rediss+sentinel"),
    ("redis+sentinel://h1/lukewarm?protocol=4", "protocol"),
    ("redis+sentinel://h1/lukewarm?sentinel_password=a&sentinel_password=b", "twice"),
    ("redis+sentinel://h1/lukewarm?sentinel_username=w", "needs sentinel_password"),
    ("redis+sentinel://h1/lukewarm?sentinel_password=", "empty"),
    ("redis+sentinel://h1/lukewarm?junk", "query string"),
    ("rediss+sentinel://h1/lukewarm?ssl_cert_reqs=maybe", "ssl_cert_reqs"),
    ("rediss+sentinel://h1/lukewarm?ssl_check_hostname=perhaps", "ssl_check_hostname"),
]


@pytest.mark.parametrize(("url", "expected"), GOOD)
def test_a_good_url_says_where_and_as_whom(url: str, expected: SentinelUrl) -> None:
    assert parse_sentinel_url(url) == expected


@pytest.mark.parametrize(("url", "problem"), BAD)
def test_a_bad_url_is_refused_naming_the_problem(url: str, problem: str) -> None:
    with pytest.raises(ValueError, match="bad Redis Sentinel URL") as caught:
        parse_sentinel_url(url)
    assert problem in str(caught.value)
    assert "redis+sentinel://[user:password@]host" in str(caught.value)  # the form it expects


def test_no_password_shows_in_an_error_or_a_repr() -> None:
    with pytest.raises(ValueError) as caught:
        parse_sentinel_url("redis+sentinel://user:hunter2@h1:bad/lukewarm?sentinel_password=swordfish")
    assert "hunter2" not in str(caught.value)
    parsed = parse_sentinel_url("redis+sentinel://user:hunter2@h1/lukewarm?sentinel_password=swordfish")
    assert "hunter2" not in repr(parsed) and "swordfish" not in repr(parsed)


@pytest.mark.parametrize(("url", "sentinel"), [
    ("redis+sentinel://h/s", True), ("rediss+sentinel://h/s", True), ("Redis+Sentinel://h/s", True),
    ("redis://h/0", False), ("rediss://h/0", False), ("unix:///run/redis.sock", False), ("", False)])
def test_the_scheme_alone_picks_sentinel(url: str, sentinel: bool) -> None:
    assert is_sentinel_url(url) is sentinel


async def test_a_plain_url_still_gives_a_plain_client() -> None:
    client = connect("redis://127.0.0.1:6379/4", 2.0, health_check_s=10)
    try:
        assert type(client) is redis.Redis
        kwargs = client.connection_pool.connection_kwargs
        assert (kwargs["db"], kwargs["socket_timeout"], kwargs["health_check_interval"]) == (4, 2.0, 10)
        assert kwargs["driver_info"] is None
        assert not client.connection_pool.maint_notifications_enabled()
    finally:
        await client.aclose()


async def test_a_sentinel_url_gives_a_client_of_the_primary_built_as_promised() -> None:
    client = connect("redis+sentinel://ingress:pw@h1:26379,h2:26380/lukewarm/5?sentinel_username=w"
                     "&sentinel_password=spw", 1.5, read_timeout=False, health_check_s=10)
    try:
        assert isinstance(client, SentinelClient)
        pool = client.connection_pool
        assert isinstance(pool, FollowingPool) and pool.is_master and pool.service_name == "lukewarm"
        assert pool.connection_class is FollowingConnection
        kwargs = pool.connection_kwargs
        assert (kwargs["db"], kwargs["username"], kwargs["password"]) == (5, "ingress", "pw")
        assert (kwargs["socket_connect_timeout"], kwargs["socket_timeout"], kwargs["health_check_interval"]) == \
            (1.5, None, 10)  # pub/sub: reads block by design
        assert kwargs["driver_info"] is None and not pool.maint_notifications_enabled()
        assert kwargs["retry"].get_retries() == 10  # a failover's errors are retried on the new primary
        sentinels = pool.sentinel_manager
        assert [(s.connection_pool.connection_kwargs["host"], s.connection_pool.connection_kwargs["port"])
                for s in sentinels.sentinels] == [("h1", 26379), ("h2", 26380)]
        for sentinel in sentinels.sentinels:
            skw = sentinel.connection_pool.connection_kwargs
            assert (skw["username"], skw["password"], skw["socket_timeout"]) == ("w", "spw", 1.5)
            assert skw["driver_info"] is None and not sentinel.connection_pool.maint_notifications_enabled()
    finally:
        await client.aclose()


async def test_rediss_sentinel_speaks_tls_to_both() -> None:
    client = connect("rediss+sentinel://h1/lukewarm?ssl_ca_certs=/etc/ca.crt", 2.0)
    try:
        pool = client.connection_pool
        assert pool.connection_class is FollowingSSLConnection
        assert pool.connection_kwargs["ssl_ca_certs"] == "/etc/ca.crt"
        sentinel = pool.sentinel_manager.sentinels[0].connection_pool
        assert sentinel.connection_class.__name__ == "SSLConnection"
        assert sentinel.connection_kwargs["ssl_ca_certs"] == "/etc/ca.crt"
    finally:
        await client.aclose()


def test_a_bad_sentinel_url_fails_at_connect() -> None:
    with pytest.raises(ValueError, match="listed twice"):
        connect("redis+sentinel://h1,h1/lukewarm", 2.0)
