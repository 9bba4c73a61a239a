"""Redis Sentinel URLs, parsed strictly: ``redis+sentinel://[user:password@]h1[:26379],h2/service[/db][?options]``.

What ``shared.redisclient.connect`` takes to reach a primary through Sentinels. Pure: no I/O.
"""
from __future__ import annotations

import dataclasses
import re
import urllib.parse
from collections.abc import Mapping
from typing import Any, NoReturn

SENTINEL_SCHEMES = {"redis+sentinel": False, "rediss+sentinel": True}  # scheme → TLS
DEFAULT_SENTINEL_PORT = 26379
URL_FORM = "redis+sentinel://[user:password@]host[:port][,host[:port]…]/service[/db][?option=value&…]"
# Options a Sentinel URL may carry; everything else (timeouts, pool sizes) is the caller's, not the URL's.
AUTH_OPTIONS = ("sentinel_username", "sentinel_password")
TLS_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_check_hostname")
OTHER_OPTIONS = ("protocol",)
CERT_REQS = ("none", "optional", "required")
# Redis names a monitored primary by any word without spaces; we allow a safe subset.
SERVICE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
HOST_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")
MAX_DB = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class SentinelUrl:
    """What a ``redis+sentinel://`` URL says (passwords kept out of ``repr``)."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = dataclasses.field(default=None, repr=False)
    sentinel_username: str | None = None
    sentinel_password: str | None = dataclasses.field(default=None, repr=False)
    tls: bool = False
    tls_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    protocol: int | None = None


def is_sentinel_url(url: str) -> bool:
    return url.partition("://")[0].lower() in SENTINEL_SCHEMES


def parse_sentinel_url(url: str) -> SentinelUrl:
    """Parse ``redis+sentinel://[user:password@]h1[:26379],h2[:26379]/service[/db][?options]`` strictly.

    ``user:password`` (percent-encoded) authenticate to the Redis servers; the Sentinels take
    ``?sentinel_username=…&sentinel_password=…``. ``rediss+sentinel://`` speaks TLS to both, with
    ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``, ``ssl_cert_reqs`` and ``ssl_check_hostname``.
    ``protocol`` (2 or 3) applies to both. Raises ``ValueError`` naming what is wrong (never a password).
    """
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in SENTINEL_SCHEMES:
        _bad("the scheme must be redis+sentinel:// or rediss+sentinel://")
    if "#" in rest:
        _bad("a fragment (#…) is not allowed; percent-encode a '#' in a password as %23")
    rest, _, query = rest.partition("?")
    authority, _, path = rest.partition("/")
    userinfo, at, hostlist = authority.rpartition("@")
    username, password = _userinfo(userinfo) if at else (None, None)
    tls = SENTINEL_SCHEMES[scheme]
    options = _options(query, tls)
    service, db = _path(path)
    return SentinelUrl(
        sentinels=_sentinels(hostlist), service=service, db=db, username=username, password=password,
        sentinel_username=options.pop("sentinel_username", None),
        sentinel_password=options.pop("sentinel_password", None),
        protocol=options.pop("protocol", None), tls=tls, tls_options=options,
    )


def _bad(problem: str) -> NoReturn:
    raise ValueError(f"bad Redis Sentinel URL: {problem} (expected {URL_FORM})")


def _userinfo(userinfo: str) -> tuple[str | None, str | None]:
    name, colon, secret = userinfo.partition(":")
    if not colon or not secret:
        _bad("credentials must be user:password@ or :password@ (a user needs a password)")
    return (urllib.parse.unquote(name) or None), urllib.parse.unquote(secret)


def _sentinels(hostlist: str) -> tuple[tuple[str, int], ...]:
    if not hostlist:
        _bad("no Sentinel address")
    found: list[tuple[str, int]] = []
    for item in hostlist.split(","):
        address = _address(item)
        if address in found:
            _bad(f"Sentinel {item!r} is listed twice")
        found.append(address)
    return tuple(found)


def _address(item: str) -> tuple[str, int]:
    if item.startswith("["):  # [IPv6]:port
        host, close, tail = item[1:].partition("]")
        if not close or not host or not re.fullmatch(r"[0-9A-Fa-f:.]+", host) or (tail and not tail.startswith(":")):
            _bad(f"Sentinel address {item!r} is not [IPv6]:port")
        port_text = tail[1:] if tail else ""
    else:
        host, _, port_text = item.partition(":")
        if not HOST_RE.fullmatch(host):
            _bad(f"Sentinel address {item!r} is not host:port")
    if not port_text:
        return host, DEFAULT_SENTINEL_PORT
    if not port_text.isascii() or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        _bad(f"the port of Sentinel {item!r} is not a number from 1 to 65535")
    return host, int(port_text)


def _path(path: str) -> tuple[str, int]:
    parts = path.split("/")
    if not path or len(parts) > 2 or not SERVICE_RE.fullmatch(parts[0]):
        _bad("the path must be /service or /service/db, the service a name of letters, digits, '.', '_', '-'")
    if len(parts) == 1:
        return parts[0], 0
    db = parts[1]
    if not db.isascii() or not db.isdigit() or int(db) > MAX_DB:
        _bad(f"the database {db!r} is not a number from 0")
    return parts[0], int(db)


def _options(query: str, tls: bool) -> dict[str, Any]:
    allowed = AUTH_OPTIONS + OTHER_OPTIONS + (TLS_OPTIONS if tls else ())
    options: dict[str, Any] = {}
    try:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        _bad("the query string is not name=value&…")
    for name, value in pairs:
        if name in options:
            _bad(f"option {name!r} is given twice")
        if name not in allowed:
            hint = " (TLS options need rediss+sentinel://)" if name in TLS_OPTIONS else ""
            _bad(f"unknown option {name!r}{hint}; allowed: {', '.join(allowed)}")
        options[name] = _option_value(name, value)
    if "sentinel_username" in options and "sentinel_password" not in options:
        _bad("sentinel_username needs sentinel_password")
    return options


def _option_value(name: str, value: str) -> Any:
    if name == "protocol":
        if value not in ("2", "3"):
            _bad("protocol must be 2 or 3")
        return int(value)
    if name == "ssl_check_hostname":
        if value.lower() not in ("true", "false", "yes", "no", "1", "0"):
            _bad("ssl_check_hostname must be true or false")
        return value.lower() in ("true", "yes", "1")
    if name == "ssl_cert_reqs" and value not in CERT_REQS:
        _bad(f"ssl_cert_reqs must be one of {', '.join(CERT_REQS)}")
    if not value:
        _bad(f"option {name!r} is empty")
    return value
