"""A real Lukewarm stack for integration tests: proxies as subprocesses, an ingress in-process.

Proxies are real ``python -m runtime_proxy`` processes so tests can SIGKILL
them; the ingress runs in the test's event loop so tests can read its view.
Every wait here is bounded.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from ingress import state as ingress_state
from ingress.app import build_app as build_ingress
from shared.settings import IngressSettings

BASE_IMAGE = "lukewarm/python:bookworm"
TEST_IMAGE = "lukewarm-test/models:latest"
MODELS_DIR = Path(__file__).with_name("models")
REPO_ROOT = Path(__file__).resolve().parents[2]
ADMIN = "test-admin-token"
SECRET = "test-proxy-secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build_test_image(workdir: Path) -> str:
    from runtime_proxy.docker_runtime import build_image

    (workdir / "Dockerfile").write_text(f"FROM {BASE_IMAGE}\nWORKDIR /app\nCOPY models/ /app/\n")
    (workdir / "models").mkdir()
    for f in MODELS_DIR.glob("*.py"):
        (workdir / "models" / f.name).write_bytes(f.read_bytes())
    build_image(str(workdir), TEST_IMAGE)
    return TEST_IMAGE


async def wait_until(predicate: Callable[[], Awaitable[bool] | bool], timeout_s: float, what: str,
                     interval_s: float = 0.02) -> None:
    """Poll ``predicate`` until true; fail with ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = predicate()
        if asyncio.iscoroutine(result) or isinstance(result, Awaitable):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(interval_s)


class ProxyProcess:
    """One ``python -m runtime_proxy`` subprocess."""

    def __init__(self, redis_url: str, state_dir: Path, runtime: str, proxy_id: str, **settings: Any) -> None:
        self.port = free_port()
        self.proxy_id = proxy_id
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "LUKEWARM_REDIS_URL": redis_url, "LUKEWARM_PROXY_SECRET": SECRET,
            "LUKEWARM_PROXY_HOST": "127.0.0.1", "LUKEWARM_PROXY_PORT": str(self.port),
            "LUKEWARM_PROXY_ID": proxy_id, "LUKEWARM_RUNTIME": runtime,
            "LUKEWARM_STATE_DIR": str(state_dir / proxy_id), "LUKEWARM_HEARTBEAT_INTERVAL_S": "0.2",
            **{f"LUKEWARM_{k.upper()}": str(v) for k, v in settings.items()},
        }
        self.log_path = state_dir / f"{proxy_id}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self, timeout_s: float = 20.0) -> None:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "runtime_proxy"], env=self.env, cwd=REPO_ROOT,
                                     stdout=log, stderr=subprocess.STDOUT)
        log.close()

        async def healthy() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"proxy {self.proxy_id} exited: {self.log_path.read_text()[-2000:]}")
            try:
                async with aiohttp.ClientSession() as s, s.get(self.url + "/healthz",
                                                               timeout=aiohttp.ClientTimeout(total=1)) as r:
                    return r.status == 200
            except (aiohttp.ClientError, asyncio.TimeoutError):
                return False

        await wait_until(healthy, timeout_s, f"proxy {self.proxy_id} to answer /healthz", 0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self, timeout_s: float = 20.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class Stack:
    """An ingress (in-process) and proxies (subprocesses) sharing one Redis."""

    def __init__(self, redis_url: str, state_dir: Path, runtime: str) -> None:
        self.redis_url = redis_url
        self.state_dir = state_dir
        self.runtime = runtime
        self.proxies: list[ProxyProcess] = []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.runner: web.AppRunner | None = None
        self.session: aiohttp.ClientSession | None = None
        self.key = ""

    @property
    def app(self) -> web.Application:
        assert self.runner is not None
        return self.runner.app

    async def add_proxy(self, **settings: Any) -> ProxyProcess:
        proxy = ProxyProcess(self.redis_url, self.state_dir, self.runtime, f"p{len(self.proxies)}-{self.port}",
                             **settings)
        await proxy.start()
        self.proxies.append(proxy)
        return proxy

    async def start_ingress(self, **settings: Any) -> None:
        config = IngressSettings(redis_url=self.redis_url, admin_token=ADMIN, proxy_secret=SECRET,
                                 ingress_host="127.0.0.1", ingress_port=self.port, view_poll_interval_s=0.1,
                                 **settings)
        self.runner = web.AppRunner(build_ingress(config))
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        self.session = aiohttp.ClientSession()

    async def wait_for_proxies(self, count: int, timeout_s: float = 10.0) -> None:
        view = self.app[ingress_state.VIEW]
        await wait_until(lambda: len(view.live_proxies()) >= count, timeout_s, f"{count} proxies in the view")

    async def request(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
                      raw: bytes | None = None, timeout_s: float = 120.0) -> tuple[int, Any, Any]:
        assert self.session is not None
        kwargs: dict[str, Any] = {"headers": headers or {}, "timeout": aiohttp.ClientTimeout(total=timeout_s)}
        if raw is not None:
            kwargs["data"] = raw
        elif body is not None:
            kwargs["json"] = body
        async with self.session.request(method, self.url + path, **kwargs) as resp:
            data = await resp.read()
            try:
                parsed = await resp.json(content_type=None) if data else None
            except ValueError:
                parsed = data
            return resp.status, parsed, resp.headers

    async def admin(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        status, data, _ = await self.request(method, path, body, {"Authorization": f"Bearer {ADMIN}"})
        return status, data

    async def customer(self, name: str = "acme", scopes: tuple[str, ...] = ("predict", "deploy")) -> str:
        status, _ = await self.admin("PUT", f"/api/v1/customers/{name}")
        assert status in (200, 201)
        status, body = await self.admin("POST", f"/api/v1/customers/{name}/keys", {"scopes": list(scopes)})
        assert status == 201, body
        if not self.key:
            self.key = body["key"]
        return str(body["key"])

    async def deploy(self, model: str, image: str, customer: str = "acme", branch: str = "main",
                     **fields: Any) -> int:
        status, body = await self.admin(
            "POST", f"/api/v1/customers/{customer}/models/{model}/branches/{branch}/versions",
            {"image": image, **fields})
        assert status == 201, body
        return int(body["version"])

    async def call(self, model: str, data: Any, version: str = "latest", key: str | None = None,
                   customer: str = "acme", extra: dict[str, Any] | None = None,
                   timeout_s: float = 120.0) -> tuple[int, Any, Any]:
        return await self.request(
            "POST", f"/v1/{model}/{version}", {"data": data, **(extra or {})},
            {"Authorization": key if key is not None else self.key, "Host": f"{customer}.localhost"},
            timeout_s=timeout_s)

    async def close(self) -> None:
        for proxy in self.proxies:
            proxy.stop()
        if self.session is not None:
            await self.session.close()
        if self.runner is not None:
            await self.runner.cleanup()


@contextlib.asynccontextmanager
async def running_stack(redis_url: str, state_dir: Path, runtime: str, proxies: int = 1,
                        **proxy_settings: Any) -> AsyncIterator[Stack]:
    stack = Stack(redis_url, state_dir, runtime)
    try:
        for _ in range(proxies):
            await stack.add_proxy(**proxy_settings)
        await stack.start_ingress()
        await stack.wait_for_proxies(proxies)
        yield stack
    finally:
        await stack.close()
        if runtime == "docker":
            for proxy in stack.proxies:
                remove_containers(f"lukewarm.proxy={proxy.proxy_id}")


def remove_containers(label: str) -> None:
    """Remove the containers the test's proxies left (a stop keeps them for re-adoption)."""
    ids = subprocess.run(["docker", "ps", "-aq", "--filter", f"label={label}"], capture_output=True, text=True,
                         timeout=30).stdout.split()
    if ids:
        subprocess.run(["docker", "rm", "-f", *ids], capture_output=True, timeout=60)
