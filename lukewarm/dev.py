"""``lukewarm dev``: an ingress and one runtime proxy in one foreground process.

Starts a Redis when none answers, deploys the example model ``hello`` for
customer ``demo``, prints an API key and a curl line, serves until Ctrl-C
(or SIGTERM) and then stops cleanly: servers first, then what it started.
With ``--tls`` (or ``--tls-cert``/``--tls-key``) the ingress port speaks HTTPS
only; ``--tls`` makes a local CA and a wildcard certificate in the state
directory and prints the CA's path and a ``curl --cacert`` line.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path

import redis.asyncio as redis
from aiohttp import web

from shared import serving
from shared.redisclient import connect
from shared.sentinel_url import is_sentinel_url
from shared.settings import IngressSettings, ProxySettings, finish_proxy_settings, generated_secret

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_DIR = REPO_ROOT / "examples" / "hello"
EXAMPLE_IMAGE = "lukewarm-example/hello:latest"
DEMO_CUSTOMER = "demo"
REDIS_START_TIMEOUT_S = 10.0


@dataclasses.dataclass(frozen=True)
class DevOptions:
    port: int = 8080
    proxy_port: int = 8081
    redis_url: str = "redis://127.0.0.1:6379/0"
    runtime: str = "auto"
    example: bool = True
    host: str = "127.0.0.1"
    state_dir: str = ""
    admin_token: str = ""
    proxy_secret: str = ""
    # HTTPS: ``tls`` makes a local CA and certificate; or both files are given.
    tls: bool = False
    tls_cert: str = ""
    tls_key: str = ""


@dataclasses.dataclass(frozen=True)
class DevTls:
    """What the ingress loads, and the CA a client trusts (empty when the files were given)."""

    cert: str = ""
    key: str = ""
    ca: str = ""


def dev_tls(options: DevOptions, state_dir: str) -> DevTls:
    """The certificate for the ingress: the given files, or a local CA's under ``state_dir/tls``.

    Blocking (key generation, file writes): called before the loop serves anything.
    """
    if options.tls and (options.tls_cert or options.tls_key):
        raise SystemExit("give --tls (a local CA) or --tls-cert and --tls-key (your files), not both")
    if options.tls_cert or options.tls_key:
        return DevTls(options.tls_cert, options.tls_key)
    if not options.tls:
        return DevTls()
    from shared.tls import make_dev_ca

    # *.localhost is ignored by OpenSSL's wildcard matching: the demo host is named outright.
    certs = make_dev_ca(Path(state_dir) / "tls", "localhost", extra_names=(f"{DEMO_CUSTOMER}.localhost",))
    return DevTls(str(certs.cert), str(certs.key), str(certs.ca_cert))


def dev_runtime(kind: str) -> str:
    """On a laptop ``auto`` may fall back to processes (the daemon never does): said out loud."""
    if kind != "auto":
        return kind
    from runtime_proxy.docker_runtime import docker_available

    if docker_available():
        return "docker"
    print("no Docker engine answers: using the process runtime (no isolation: run only your own code)", flush=True)
    return "process"


async def redis_answers(url: str, timeout_s: float = 1.0) -> bool:
    client = connect(url, timeout_s)
    try:
        return bool(await client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        await client.aclose()


@contextlib.asynccontextmanager
async def ensure_redis(url: str) -> AsyncIterator[None]:
    """A Redis at ``url``: the one that answers, or one started here (and stopped on exit)."""
    if await redis_answers(url):
        yield
        return
    if is_sentinel_url(url):
        raise SystemExit(f"no Redis primary answers through the Sentinels of {url.split('@')[-1]}")
    server = shutil.which("redis-server")
    if server is None:
        raise SystemExit(f"no Redis answers at {url} and redis-server is not installed (make run installs it)")
    parts = urllib.parse.urlparse(url)
    proc = subprocess.Popen(
        [server, "--port", str(parts.port or 6379), "--bind", parts.hostname or "127.0.0.1",
         "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + REDIS_START_TIMEOUT_S
        while not await redis_answers(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"redis-server did not answer at {url} within {REDIS_START_TIMEOUT_S:.0f} s")
            await asyncio.sleep(0.05)
        print(f"started redis-server at {url}", flush=True)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()


async def example_image(runtime_name: str) -> str:
    """The example's image reference for this runtime, built when needed."""
    if runtime_name == "process":
        return f"dir:{EXAMPLE_DIR}"
    from runtime_proxy.docker_runtime import build_image

    print(f"building {EXAMPLE_IMAGE} from {EXAMPLE_DIR} ...", flush=True)
    await asyncio.to_thread(build_image, str(EXAMPLE_DIR), EXAMPLE_IMAGE)
    return EXAMPLE_IMAGE


async def deploy_example(app: web.Application, image: str) -> str:
    """Customer ``demo``, a predict key and version of ``hello``; returns the key."""
    from ingress import state

    registry = app[state.REGISTRY]
    await registry.put_customer(DEMO_CUSTOMER)
    _, key = await registry.create_key(DEMO_CUSTOMER, ("deploy", "predict"))
    spec = await registry.create_version(DEMO_CUSTOMER, "hello", "main", {"image": image, "entrypoint": "main:predict"})
    print(f"deployed {spec.key} ({image})", flush=True)
    return key


def curl_line(host: str, port: int, key: str, https: bool = False, ca: str = "") -> str:
    """A curl line calling the example; over HTTPS trusting ``ca`` only when given."""
    if not https:
        return (f"curl -s -H 'Host: {DEMO_CUSTOMER}.localhost' -H 'Authorization: {key}' "
                f"-d '{{\"data\": \"world\"}}' http://{host}:{port}/v1/hello/latest")
    # --resolve: the name is sent as SNI and Host, and checked against the certificate, with no DNS.
    name = f"{DEMO_CUSTOMER}.localhost"
    cacert = f"--cacert {shlex.quote(ca)} " if ca else ""
    return (f"curl -s {cacert}--resolve {name}:{port}:{connect_address(host)} "
            f"-H 'Authorization: {key}' -d '{{\"data\": \"world\"}}' https://{name}:{port}/v1/hello/latest")


def connect_address(host: str) -> str:
    """Where a local client reaches a server bound to ``host`` (a wildcard bind is reached on loopback)."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


async def serve(options: DevOptions) -> None:
    from ingress.app import build_app as build_ingress
    from runtime_proxy.daemon import build_app as build_proxy, make_runtime

    admin_token = options.admin_token or generated_secret()
    secret = options.proxy_secret or generated_secret()
    # One directory for every dev run: replica ids and the content-addressed harness never collide.
    state_dir = options.state_dir or str(Path.home() / ".cache" / "lukewarm" / "dev")
    tls = dev_tls(options, state_dir)
    runtime = make_runtime(dev_runtime(options.runtime))
    proxy_settings = finish_proxy_settings(ProxySettings(
        redis_url=options.redis_url, proxy_secret=secret, proxy_host=options.host, proxy_port=options.proxy_port,
        runtime=runtime.name, state_dir=state_dir, proxy_id=f"dev-{options.proxy_port}",
        stop_replicas_on_exit=True,
    ))
    ingress_settings = IngressSettings(
        redis_url=options.redis_url, admin_token=admin_token, proxy_secret=secret,
        ingress_host=options.host, ingress_port=options.port, tls_cert=tls.cert, tls_key=tls.key,
    )
    # Before the loop: a wrong certificate or key is one line, and nothing has started yet.
    listeners = [serving.proxy_listener(proxy_settings), serving.ingress_listener(ingress_settings)]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with ensure_redis(options.redis_url):
        image = await example_image(runtime.name) if options.example else ""
        apps = [build_proxy(proxy_settings, runtime), build_ingress(ingress_settings)]
        runners: list[web.AppRunner] = []
        try:
            for app, listener, cancels in zip(apps, listeners, (True, False)):
                try:
                    runners.append(await serving.start_server(app, listener, handler_cancellation=cancels))
                except OSError as exc:
                    raise SystemExit(f"cannot listen on {listener.host}:{listener.port}: "
                                     f"{exc.strerror or exc}") from None
            print(f"ingress {listeners[1].scheme}://{options.host}:{options.port}  "
                  f"proxy {proxy_settings.advertise_url}  runtime {runtime.name}", flush=True)
            print(f"admin token: {admin_token}", flush=True)
            if tls.ca:
                print(f"TLS only; the certificate is signed by a local CA: {tls.ca} (give clients that file)",
                      flush=True)
            if options.example:
                key = await deploy_example(runners[1].app, image)
                print(f"API key for customer {DEMO_CUSTOMER}: {key}", flush=True)
                print("try:", flush=True)
                print("  " + curl_line(options.host, options.port, key, https=bool(tls.cert), ca=tls.ca),
                      flush=True)
            print("serving; Ctrl-C stops", flush=True)
            await stop.wait()
            print("stopping ...", flush=True)
        finally:
            for runner in reversed(runners):
                await runner.cleanup()
    print("stopped", flush=True)


def run(options: DevOptions) -> int:
    from shared.eventloop import install_uvloop

    install_uvloop()
    try:
        asyncio.run(serve(options))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(run(DevOptions()))
