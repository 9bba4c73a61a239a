"""Settings: defaults, then LUKEWARM_* variables, then flags."""
from __future__ import annotations

import dataclasses
import socket
from typing import Any

import pytest

from shared.settings import IngressSettings, ProxySettings, finish_proxy_settings, load_settings


def test_defaults_without_env_or_flags() -> None:
    assert load_settings(IngressSettings, [], {}) == IngressSettings()
    assert load_settings(ProxySettings, None, {}) == ProxySettings()
    defaults = IngressSettings()
    assert (defaults.redis_url, defaults.base_domain, defaults.ingress_port, defaults.max_body_mb) == (
        "redis://127.0.0.1:6379/0", "localhost", 8080, 32)
    assert ProxySettings().proxy_port == 8081


def test_reads_the_given_environment_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LUKEWARM_INGRESS_PORT", "9999")
    assert load_settings(IngressSettings, [], {}).ingress_port == 8080
    assert load_settings(IngressSettings, []).ingress_port == 9999  # None: the process environment


@pytest.mark.parametrize(
    ("cls", "env", "field", "expected"),
    [
        (IngressSettings, {"LUKEWARM_REDIS_URL": "redis://r:1/2"}, "redis_url", "redis://r:1/2"),
        (IngressSettings, {"LUKEWARM_BASE_DOMAIN": "app.example.com"}, "base_domain", "app.example.com"),
        (IngressSettings, {"LUKEWARM_INGRESS_PORT": "9000"}, "ingress_port", 9000),
        (IngressSettings, {"LUKEWARM_DEFAULT_TIMEOUT_S": "2.5"}, "default_timeout_s", 2.5),
        (IngressSettings, {"LUKEWARM_INGRESS_PORT": ""}, "ingress_port", 8080),  # empty means unset
        (IngressSettings, {"INGRESS_PORT": "1"}, "ingress_port", 8080),  # the prefix is required
        (ProxySettings, {"LUKEWARM_PROXY_PORT": "7000"}, "proxy_port", 7000),
        (ProxySettings, {"LUKEWARM_RUNTIME": "process"}, "runtime", "process"),
        (ProxySettings, {"LUKEWARM_MAX_REPLICAS": " 3 "}, "max_replicas", 3),
    ],
)
def test_env_overrides(cls: type, env: dict[str, str], field: str, expected: Any) -> None:
    assert getattr(load_settings(cls, [], env), field) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("1", True), ("true", True), ("TRUE", True), ("yes", True), ("on", True), (" On ", True),
     ("0", False), ("false", False), ("no", False), ("off", False)],
)
def test_bool_from_env(raw: str, expected: bool) -> None:
    settings = load_settings(ProxySettings, [], {"LUKEWARM_STOP_REPLICAS_ON_EXIT": raw})
    assert settings.stop_replicas_on_exit is expected


@pytest.mark.parametrize(
    ("argv", "env", "expected"),
    [
        (["--stop-replicas-on-exit"], {}, True),
        (["--no-stop-replicas-on-exit"], {"LUKEWARM_STOP_REPLICAS_ON_EXIT": "1"}, False),
        (["--stop-replicas-on-exit"], {"LUKEWARM_STOP_REPLICAS_ON_EXIT": "0"}, True),
        ([], {"LUKEWARM_STOP_REPLICAS_ON_EXIT": "1"}, True),
        ([], {}, False),
    ],
)
def test_bool_flags(argv: list[str], env: dict[str, str], expected: bool) -> None:
    assert load_settings(ProxySettings, argv, env).stop_replicas_on_exit is expected


@pytest.mark.parametrize(
    ("argv", "env", "field", "expected"),
    [
        (["--ingress-port", "8123"], {"LUKEWARM_INGRESS_PORT": "9000"}, "ingress_port", 8123),
        (["--redis-url", "redis://flag"], {"LUKEWARM_REDIS_URL": "redis://env"}, "redis_url", "redis://flag"),
        (["--max-staleness-s", "1.5"], {}, "max_staleness_s", 1.5),
        (["--admin-token", "tok"], {"LUKEWARM_ADMIN_TOKEN": "envtok"}, "admin_token", "tok"),
        ([], {"LUKEWARM_ADMIN_TOKEN": "envtok"}, "admin_token", "envtok"),
    ],
)
def test_flags_beat_env(argv: list[str], env: dict[str, str], field: str, expected: Any) -> None:
    assert getattr(load_settings(IngressSettings, argv, env), field) == expected


def test_flags_and_env_combine() -> None:
    s = load_settings(IngressSettings, ["--ingress-port", "1"], {"LUKEWARM_BASE_DOMAIN": "x.test"})
    assert (s.ingress_port, s.base_domain) == (1, "x.test")


@pytest.mark.parametrize(
    ("cls", "name", "raw"),
    [
        (IngressSettings, "LUKEWARM_INGRESS_PORT", "eighty"),
        (IngressSettings, "LUKEWARM_MAX_BODY_MB", "1.5"),
        (IngressSettings, "LUKEWARM_DEFAULT_TIMEOUT_S", "soon"),
        (ProxySettings, "LUKEWARM_MAX_REPLICAS", "many"),
    ],
)
def test_bad_number_in_env_exits_naming_the_variable(cls: type, name: str, raw: str) -> None:
    with pytest.raises(SystemExit) as info:
        load_settings(cls, [], {name: raw})
    assert name in str(info.value.code)


@pytest.mark.parametrize("argv", [["--ingress-port", "x"], ["--no-such-flag"]])
def test_bad_flags_exit(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        load_settings(IngressSettings, argv, {})


@pytest.mark.parametrize(
    ("given", "proxy_id", "advertise_url"),
    [
        ({}, "{host}-8081", "http://127.0.0.1:8081"),
        ({"proxy_port": 9001}, "{host}-9001", "http://127.0.0.1:9001"),
        ({"proxy_host": "127.0.0.3", "proxy_port": 7000}, "{host}-7000", "http://127.0.0.3:7000"),
        ({"proxy_host": "::1"}, "{host}-8081", "http://[::1]:8081"),
        ({"proxy_host": "10.0.0.5", "advertise_url": "http://10.0.0.5:7000"}, "{host}-8081", "http://10.0.0.5:7000"),
        ({"proxy_id": "gpu-7"}, "gpu-7", "http://127.0.0.1:8081"),
        ({"advertise_url": "http://lb:1"}, "{host}-8081", "http://lb:1"),
        ({"proxy_id": "a", "advertise_url": "http://b"}, "a", "http://b"),
        ({"proxy_host": "0.0.0.0", "advertise_url": "http://10.1.2.3:8081"}, "{host}-8081", "http://10.1.2.3:8081"),
    ],
)
def test_finish_proxy_settings(given: dict[str, Any], proxy_id: str, advertise_url: str) -> None:
    settings = ProxySettings(**given)
    done = finish_proxy_settings(settings)
    assert (done.proxy_id, done.advertise_url) == (proxy_id.format(host=socket.gethostname()), advertise_url)
    # nothing else changes
    assert dataclasses.replace(done, proxy_id=settings.proxy_id, advertise_url=settings.advertise_url) == settings


def test_finish_proxy_settings_is_idempotent() -> None:
    once = finish_proxy_settings(ProxySettings(proxy_port=1234))
    assert finish_proxy_settings(once) is once


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "10.0.0.5"])
def test_binding_beyond_loopback_needs_an_advertise_url(host: str) -> None:
    with pytest.raises(SystemExit, match="LUKEWARM_ADVERTISE_URL"):
        finish_proxy_settings(ProxySettings(proxy_host=host))


@pytest.mark.parametrize("url", ["10.0.0.5:8081", "https://x:1", "http://"])
def test_a_malformed_advertise_url_is_refused(url: str) -> None:
    with pytest.raises(SystemExit, match="LUKEWARM_ADVERTISE_URL"):
        finish_proxy_settings(ProxySettings(advertise_url=url))


def test_the_proxy_binds_loopback_by_default() -> None:
    assert ProxySettings().proxy_host == "127.0.0.1"


def test_secrets_come_from_files(tmp_path: Any) -> None:
    (tmp_path / "token").write_text("s3cret\n")
    settings = load_settings(IngressSettings, [], {"LUKEWARM_ADMIN_TOKEN_FILE": str(tmp_path / "token")})
    assert settings.admin_token == "s3cret"
    with pytest.raises(SystemExit, match="LUKEWARM_PROXY_SECRET_FILE"):
        load_settings(IngressSettings, [], {"LUKEWARM_PROXY_SECRET_FILE": str(tmp_path / "missing")})


@pytest.mark.parametrize(("url", "says"), [
    ("http://127.0.0.1:6379/0", "must start with redis://"),
    ("127.0.0.1:6379", "must start with redis://"),
    ("redis+sentinel://h1:26379", "bad Redis Sentinel URL"),
    ("redis+sentinel://user@h1/lukewarm", "bad Redis Sentinel URL"),
])
def test_a_redis_url_no_client_could_use_is_a_one_line_exit(url: str, says: str) -> None:
    with pytest.raises(SystemExit) as info:
        load_settings(IngressSettings, [], {"LUKEWARM_REDIS_URL": url})
    assert says in str(info.value) and "\n" not in str(info.value)


def test_plain_and_sentinel_redis_urls_are_taken() -> None:
    for url in ("redis://127.0.0.1:6379/0", "rediss://u:p@h/1", "redis+sentinel://h1,h2:26380/lukewarm/2"):
        assert load_settings(ProxySettings, [], {"LUKEWARM_REDIS_URL": url}).redis_url == url


@pytest.mark.parametrize("raw", ["0", "-5", "nan", "0.5"])
def test_the_full_collection_interval_must_be_a_second_or_more(raw: str) -> None:
    with pytest.raises(SystemExit, match="LUKEWARM_GC_FULL_EVERY_S"):
        load_settings(IngressSettings, [], {"LUKEWARM_GC_FULL_EVERY_S": raw})
    assert load_settings(IngressSettings, [], {"LUKEWARM_GC_FULL_EVERY_S": "60"}).gc_full_every_s == 60.0
