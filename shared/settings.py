"""One typed settings object per process, read from ``LUKEWARM_*`` and flags.

Every field of a settings dataclass is settable as the environment variable
``LUKEWARM_<FIELD>`` and as the flag ``--<field-with-dashes>``; a flag beats
the environment, which beats the default. A secret never has to be a flag
(flags show in ``ps``): every text field can also be read from a file named by
``LUKEWARM_<FIELD>_FILE``. Nothing here runs at import time: ``main()`` builds
the object and passes it down.
"""
from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
import secrets
import socket
import urllib.parse
from pathlib import Path
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar, get_type_hints

from shared.sentinel_url import is_sentinel_url, parse_sentinel_url

ENV_PREFIX = "LUKEWARM_"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class IngressSettings:
    """Settings of one ingress process."""

    redis_url: str = DEFAULT_REDIS_URL
    base_domain: str = "localhost"
    admin_token: str = ""
    proxy_secret: str = ""
    ingress_host: str = "0.0.0.0"
    ingress_port: int = 8080
    max_body_mb: int = 32
    # Default deadline of a request when its version sets none.
    default_timeout_s: float = 60.0
    # How old the local view may grow while Redis is unreachable before
    # /readyz reports the degradation.
    max_staleness_s: float = 120.0
    view_poll_interval_s: float = 1.0
    # The garbage collector's full pass over the heap (the fleet view: ~20 ms at 5000 proxies) runs this
    # often and never on its own (shared/heap.py); young passes run at least every 20 ms.
    gc_full_every_s: float = 600.0
    proxy_connect_timeout_s: float = 2.0
    chunk_retries: int = 2
    # Requests of one version in flight at this ingress before new ones get 503 + Retry-After.
    max_pending_per_version: int = 1000
    # A chunk on a warm replica still running after hedge_factor × its measured time (at
    # least hedge_min_ms) is sent to a second warm proxy too; first answer wins. 0: never.
    hedge_factor: float = 4.0
    hedge_min_ms: float = 200.0
    # HTTPS: both set makes the ingress port speak TLS (1.2+) only.
    tls_cert: str = ""
    tls_key: str = ""
    # A connection must deliver a request's headers (and be idle no longer) within this.
    header_timeout_s: float = 10.0
    # A request's body must arrive within this once its headers did.
    body_timeout_s: float = 30.0
    # Open client connections at once; past this a new connection gets 503 and is closed.
    max_connections: int = 4096
    max_batch_items: int = 100_000
    # Requests of one customer in flight at this ingress before new ones get 429.
    max_inflight_per_customer: int = 256
    # Nesting of an inference body: far below what the harness's parser survives.
    max_json_depth: int = 64
    # A cached API key is re-read from Redis once older than this (revocation without pub/sub).
    key_cache_s: float = 2.0
    # Largest memory_mb a deploy may ask for.
    max_memory_mb: int = 65_536
    # Largest cpus a deploy may ask for.
    max_cpus: float = 16.0
    # A customer's key may deploy images under <image_prefix><customer>/ or these (comma-separated).
    image_prefix: str = "lukewarm-"
    shared_images: str = ""
    # Largest answer a model may give (the proxies' setting too): caps what a proxy's answer may hold.
    max_response_mb: int = 64
    # How long a deploy with capacity.min > 0 may take to get its replicas ready before it is refused.
    rollout_timeout_s: float = 120.0
    # SIGTERM: stop accepting, give requests in flight this long to finish, then exit.
    drain_timeout_s: float = 30.0
    # text | json (one object per line, with the request id); DEBUG | INFO | WARNING | ERROR.
    log_format: str = "text"
    log_level: str = "INFO"
    # Processes serving the one port (SO_REUSEPORT), each a whole ingress; a supervisor restarts one that dies.
    workers: int = 1
    # Bind with SO_REUSEPORT (what --workers sets for its workers; or to run several ingresses by hand).
    reuse_port: bool = False

    # usage
    # Request and error counts (GET …/usage) are written to Redis in batches this often, off the
    # request path; a stopping ingress writes what is left.
    usage_flush_s: float = 2.0

    # capacity
    # The fleet's capacity loop (ingress/reconciler.py) runs on the one ingress holding its lease:
    # it keeps capacity.min replicas ready and adds replicas under load. 0: this ingress never runs it.
    reconcile_interval_s: float = 1.0
    # A holder that stops renewing (dies, hangs, loses Redis) is replaced within about this plus an interval.
    lease_ttl_s: float = 5.0
    # A version's target replicas falls only once its load has stayed lower for this long (capped by
    # its idle_timeout_s, so the loop never wakes what the proxies' idle policy just paused).
    downscale_delay_s: float = 30.0
    # ... and from 1 to 0 (capacity.min 0) only once it has had no request at all for this long.
    downscale_to_zero_delay_s: float = 300.0
    # A new replica that must start cold is added once the overload has lasted this many cold starts
    # (measured per version), or at once when the queue would take longer than a cold start to drain.
    cold_start_patience: float = 1.0
    # How long the loop's call for new replicas may take on a proxy (a cold start, an image pull).
    warm_timeout_s: float = 120.0
    # A version this young is left to its deploy's own pre-warm (which has as long to get capacity.min
    # ready before `latest` moves), so that the two do not both start replicas on different hosts.
    new_version_grace_s: float = 120.0


@dataclasses.dataclass(frozen=True)
class ProxySettings:
    """Settings of one runtime proxy daemon (one per host)."""

    redis_url: str = DEFAULT_REDIS_URL
    proxy_secret: str = ""
    # Loopback unless told otherwise; any other address needs advertise_url (fail fast).
    proxy_host: str = "127.0.0.1"
    proxy_port: int = 8081
    # Address ingresses use to reach this proxy; derived from a loopback bind when empty.
    advertise_url: str = ""
    proxy_id: str = ""
    # docker | process | auto (docker, and exit when no engine answers: never falls back to process)
    runtime: str = "auto"
    state_dir: str = "/var/lib/lukewarm"
    heartbeat_interval_s: float = 2.0
    heartbeat_ttl_s: float = 10.0
    ready_timeout_s: float = 60.0
    # Replicas (running or paused) this host keeps at most.
    max_replicas: int = 16
    # Concurrent chunks one replica accepts.
    replica_concurrency: int = 1
    # Memory of live replicas this host may hold; 0: 75 % of the host's RAM.
    memory_budget_mb: int = 0
    # Live replicas one customer may hold on this host (0: half of max_replicas).
    max_replicas_per_customer: int = 0
    reaper_interval_s: float = 1.0
    pause_stop_after_s: float = 3600.0
    # A stopped replica idle this much longer is removed (container deleted), down to its version's capacity.min.
    stop_remove_after_s: float = 86400.0
    # Model images this proxy ran are removed once no replica here uses them for this long,
    # or sooner (least recently used first) while more than max_images are kept.
    image_idle_s: float = 7 * 86400.0
    max_images: int = 50
    start_backoff_s: float = 5.0
    # A stop normally leaves containers running for the next start to re-adopt;
    # `lukewarm dev` removes them instead, so a Ctrl-C leaves nothing behind.
    stop_replicas_on_exit: bool = False
    gpus: bool = True  # use NVML when a driver answers; off: GPU versions are refused here
    # A GPU model stays at least this long before another may take its GPU (damps thrash).
    gpu_min_residency_s: float = 30.0
    # How long a swap waits for NVML to show the old model's memory released before killing it.
    gpu_release_timeout_s: float = 15.0
    # Largest answer a model may send over its socket; past it the caller gets 502 response_too_large.
    max_response_mb: int = 64
    # Largest chunk an ingress may send.
    max_body_mb: int = 64
    header_timeout_s: float = 10.0
    max_connections: int = 1024
    # Size of the tmpfs each replica's socket directory lives on (the only host path it can write).
    run_dir_kb: int = 1024
    # Container log rotation: json-file logs capped at log_max_mb × 2 files.
    log_max_mb: int = 10
    # How long a version spec read from Redis is trusted before it is read again.
    spec_cache_s: float = 5.0
    # Registry login for pulls by digest: a Docker config.json ({"auths": {host: {auth|username+password}}}).
    registry_auth_file: str = ""
    # A chunk (request id + chunk index) already run here within this window is answered from its first
    # run, not run again: an ingress's retry or hedge never runs a model twice on one host.
    dedup_window_s: float = 300.0
    # Answers remembered for that at most (bytes); past it the oldest are forgotten first.
    dedup_max_mb: int = 64
    # SIGTERM: stop taking chunks, give those in flight this long to finish, then exit (containers stay).
    drain_timeout_s: float = 30.0
    log_format: str = "text"
    log_level: str = "INFO"

    # usage
    # Replica-seconds are accrued from the replicas' states this often (by the clock: a transition
    # between two ticks costs at most half a tick of accuracy) and written to Redis this often.
    usage_tick_s: float = 2.0
    usage_flush_s: float = 10.0


def _coerce(kind: Any, raw: str) -> Any:
    if kind is bool:
        return raw.strip().lower() in {"1", "true", "yes", "on"}
    if kind is int:
        return int(raw)
    if kind is float:
        return float(raw)
    return raw


def load_settings(
    cls: type[T],
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
    prog: str | None = None,
) -> T:
    """Build ``cls`` from defaults, then ``LUKEWARM_*`` variables, then flags."""
    env = os.environ if environ is None else environ
    hints = get_type_hints(cls)
    parser = argparse.ArgumentParser(prog=prog)
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        kind = hints[field.name]
        env_name = ENV_PREFIX + field.name.upper()
        if kind is str and env.get(env_name + "_FILE"):
            values[field.name] = read_secret_file(env_name + "_FILE", env[env_name + "_FILE"])
        if env_name in env and env[env_name] != "":
            try:
                values[field.name] = _coerce(kind, env[env_name])
            except ValueError as exc:
                raise SystemExit(f"{env_name}: {exc}") from None
        flag = "--" + field.name.replace("_", "-")
        if kind is bool:
            parser.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction, default=None)
        else:
            parser.add_argument(flag, dest=field.name, type=kind, default=None)
    args = parser.parse_args(list(argv or []))
    for name, value in vars(args).items():
        if value is not None:
            values[name] = value
    if "redis_url" in values:
        check_redis_url(values["redis_url"])
    if "gc_full_every_s" in values and not values["gc_full_every_s"] >= 1:  # NaN too
        raise SystemExit(f"LUKEWARM_GC_FULL_EVERY_S must be at least 1 (seconds), got {values['gc_full_every_s']}")
    return cls(**values)


def check_redis_url(url: str) -> None:
    """SystemExit with one line for a Redis URL no client could use (a daemon must not start, then trace back)."""
    scheme = url.partition("://")[0].lower()
    if is_sentinel_url(url):
        try:
            parse_sentinel_url(url)
        except ValueError as exc:
            raise SystemExit(f"LUKEWARM_REDIS_URL: {exc}") from None
    elif scheme not in ("redis", "rediss", "unix") or "://" not in url:
        raise SystemExit("LUKEWARM_REDIS_URL must start with redis://, rediss://, unix://, redis+sentinel:// or "
                         "rediss+sentinel://")


def read_secret_file(name: str, path: str) -> str:
    """The first line of a secret file (systemd credentials, Kubernetes secrets)."""
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        raise SystemExit(f"{name}: cannot read {path}: {exc.strerror or exc}") from None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def finish_proxy_settings(settings: ProxySettings) -> ProxySettings:
    """Fill what defaults cannot know statically: id and advertised address.

    A proxy bound beyond loopback must be told the address ingresses reach it by:
    guessing would advertise an address other hosts cannot use (SystemExit).
    """
    changes: dict[str, Any] = {}
    if not settings.proxy_id:
        changes["proxy_id"] = f"{socket.gethostname()}-{settings.proxy_port}"
    if settings.advertise_url:
        parts = urllib.parse.urlsplit(settings.advertise_url)
        if parts.scheme != "http" or not parts.hostname:
            raise SystemExit(f"LUKEWARM_ADVERTISE_URL must look like http://10.0.0.5:8081, got {settings.advertise_url!r}")
    elif is_loopback(settings.proxy_host):
        host = f"[{settings.proxy_host}]" if ":" in settings.proxy_host else settings.proxy_host
        changes["advertise_url"] = f"http://{host}:{settings.proxy_port}"
    else:
        raise SystemExit(f"the proxy binds {settings.proxy_host or 'every address'!r}, beyond loopback: set "
                         "LUKEWARM_ADVERTISE_URL to the address ingresses reach it by (e.g. http://10.0.0.5:8081)")
    return dataclasses.replace(settings, **changes) if changes else settings


def generated_secret() -> str:
    return secrets.token_urlsafe(24)
