"""A real Lukewarm stack for integration tests, on the benchmarks' own stack (loadtests.common):
proxies as ``python -m runtime_proxy`` subprocesses (so tests can SIGKILL them), an ingress
in-process (so tests can read its view). Every wait is bounded.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from loadtests.common import (  # noqa: F401 - re-exported for the tests
    ADMIN, BASE_IMAGE, REPO_ROOT, SECRET, BenchStack, ProxyProcess, free_port, remove_containers, stop_process,
    unmount_below, wait_until,
)

TEST_IMAGE = "lukewarm-test/models:latest"
MODELS_DIR = Path(__file__).with_name("models")


def build_test_image(workdir: Path) -> str:
    from runtime_proxy.docker_runtime import build_image

    (workdir / "Dockerfile").write_text(f"FROM {BASE_IMAGE}\nWORKDIR /app\nCOPY models/ /app/\n")
    (workdir / "models").mkdir()
    for f in MODELS_DIR.glob("*.py"):
        (workdir / "models" / f.name).write_bytes(f.read_bytes())
    build_image(str(workdir), TEST_IMAGE)
    return TEST_IMAGE


class Stack(BenchStack):
    """The benchmark stack with the conveniences tests want: raw bodies, any deploy field, ``acme``."""

    image = ""

    async def add_proxy(self, **settings: Any) -> ProxyProcess:
        settings.setdefault("heartbeat_interval_s", 0.2)
        return await super().add_proxy(**settings)

    async def start_ingress(self, **settings: Any) -> None:
        await super().start_ingress(**{"view_poll_interval_s": 0.1, **settings})

    async def customer(self, name: str = "acme", scopes: tuple[str, ...] = ("predict", "deploy")) -> str:
        return await self.create_customer(name, scopes)

    async def deploy(self, model: str, image: str, entrypoint: str | None = None,  # type: ignore[override]
                     customer: str | None = None, branch: str = "main", **fields: Any) -> int:
        if entrypoint is not None:
            fields["entrypoint"] = entrypoint
        status, body = await self.admin(
            "POST", f"/api/v1/customers/{customer or self.customer_name or 'acme'}/models/{model}"
                    f"/branches/{branch}/versions", {"image": image, **fields})
        assert status == 201, body
        return int(body["version"])

    async def call(self, model: str, data: Any, version: str = "latest",  # type: ignore[override]
                   key: str | None = None, customer: str = "acme", extra: dict[str, Any] | None = None,
                   timeout_s: float = 120.0) -> tuple[int, Any, Any]:
        headers = {"Authorization": self.key if key is None else key, "Host": f"{customer}.localhost"}
        return await self.request("POST", f"/v1/{model}/{version}", {"data": data, **(extra or {})}, headers,
                                  timeout_s)


@contextlib.asynccontextmanager
async def running_stack(redis_url: str, state_dir: Path, runtime: str, proxies: int = 1,
                        ingress: dict[str, Any] | None = None, **proxy_settings: Any) -> AsyncIterator[Stack]:
    stack = Stack(redis_url, state_dir, runtime)
    try:
        for _ in range(proxies):
            await stack.add_proxy(**proxy_settings)
        await stack.start_ingress(**(ingress or {}))
        await stack.wait_for_proxies(proxies)
        yield stack
    finally:
        await stack.teardown()


def read_until(proc: subprocess.Popen[str], marker: str, timeout_s: float) -> list[str]:
    """Lines of ``proc``'s output up to the one starting with ``marker`` (bounded)."""
    lines: list[str] = []
    deadline = time.monotonic() + timeout_s
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                break
            continue
        lines.append(line.rstrip("\n"))
        if line.strip().startswith(marker):
            return lines
    raise AssertionError(f"no line starting with {marker!r} within {timeout_s} s; output: {lines}")


@contextlib.contextmanager
def dev_process(*args: str, home: Path | None = None) -> Iterator[subprocess.Popen[str]]:
    """``lukewarm dev`` with ``args`` (output piped, for ``read_until``); killed on the way out if the
    test failed before stopping it (``stop_dev``). ``home``: where dev keeps its state."""
    env = {**os.environ, "HOME": str(home)} if home is not None else None
    proc = subprocess.Popen([sys.executable, "-m", "lukewarm.cli", "dev", *args], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def stop_dev(proc: subprocess.Popen[str]) -> None:
    """Ctrl-C: ``lukewarm dev`` stops cleanly and says so."""
    proc.send_signal(signal.SIGINT)
    rest = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, rest
    assert "stopped" in rest
