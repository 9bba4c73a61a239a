"""Helpers every benchmark shares: a real Lukewarm stack started and stopped here.

Self-contained (nothing from ``tests/``): a throwaway ``redis-server`` on a
free port (or a DB of an existing one), N ``python -m runtime_proxy``
subprocesses with their own state dirs under /tmp, the ingress in-process,
a customer and key, a tiny model image (docker) or code dir (process), and
``report()`` which prints a table and, as the LAST line, one JSON object.

Every wait is bounded; ``bench_stack`` tears everything down even on error:
proxies get SIGTERM (then SIGKILL), their containers are removed by the
label ``lukewarm.proxy=<id>``, the Redis started here is stopped.
"""
from __future__ import annotations

import asyncio
import atexit
import contextlib
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from lukewarm.dev import redis_answers

REPO_ROOT = Path(__file__).resolve().parents[1]
BASE_IMAGE = "lukewarm/python:bookworm"
ADMIN = "bench-admin-token"
SECRET = "bench-proxy-secret"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/13"

# ---- small utilities ---------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


async def wait_until(predicate: Callable[[], Awaitable[bool] | bool], timeout_s: float, what: str,
                     interval_s: float = 0.05) -> None:
    """Poll ``predicate`` until true; raise ``TimeoutError`` naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = predicate()
        if isinstance(result, Awaitable):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(interval_s)


def docker_answers(timeout_s: float = 3.0) -> bool:
    try:
        from runtime_proxy.docker_runtime import docker_available
    except ImportError:
        return False
    return docker_available(timeout_s)


def default_runtime() -> str:
    """docker when the engine answers (and has the base image), else process."""
    if not docker_answers():
        return "process"
    probe = subprocess.run(["docker", "image", "inspect", BASE_IMAGE], capture_output=True, timeout=30)
    return "docker" if probe.returncode == 0 else "process"


def run_async(coro: Awaitable[Any]) -> Any:
    """Run ``coro`` on uvloop when installed (as the daemons do), else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)  # type: ignore[arg-type]
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)  # type: ignore[arg-type]


# ---- processes, from /proc -------------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[bytes]:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return f.read().rsplit(b")", 1)[1].split()


def _start_time(pid: int) -> int | None:
    try:
        return int(_stat_fields(pid)[19])
    except (OSError, IndexError, ValueError):
        return None


def descendants(root: int) -> list[tuple[int, int | None]]:
    """(pid, start time) of ``root`` and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                children.setdefault(int(_stat_fields(int(entry))[1]), []).append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append((pid, _start_time(pid)))
        todo.extend(children.get(pid, []))
    return out


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU seconds of ``pids`` (those still alive), at the kernel's tick resolution."""
    total = 0.0
    for pid in pids:
        try:
            fields = _stat_fields(pid)
            total += (int(fields[11]) + int(fields[12])) / CLK_TCK
        except (OSError, IndexError, ValueError):
            pass
    return total


# ---- statistics and output ---------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (0..100) by linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    data = sorted(values)
    if len(data) == 1:
        return float(data[0])
    rank = (len(data) - 1) * p / 100.0
    lo = math.floor(rank)
    hi = min(lo + 1, len(data) - 1)
    return float(data[lo] + (data[hi] - data[lo]) * (rank - lo))


def p50(values: Sequence[float]) -> float:
    return percentile(values, 50)


def p99(values: Sequence[float]) -> float:
    return percentile(values, 99)


def rounded(value: Any, digits: int = 3) -> Any:
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, digits)
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v, digits) for v in value]
    return value


def report(table_rows: Sequence[Sequence[Any]], result: dict[str, Any]) -> None:
    """Print ``table_rows`` (first row = header) as a table, then ``result`` as the last line (JSON)."""
    rows = [[_cell(c) for c in row] for row in table_rows]
    if rows:
        widths = [max(len(r[i]) if i < len(r) else 0 for r in rows) for i in range(max(len(r) for r in rows))]
        for n, row in enumerate(rows):
            cells = [c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(row)]
            print("  ".join(cells).rstrip())
            if n == 0:
                print("  ".join("-" * w for w in widths))
    sys.stdout.flush()
    sys.stdout.write(orjson.dumps(rounded(result)).decode() + "\n")
    sys.stdout.flush()


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def log(message: str) -> None:
    """Progress goes to stderr, so stdout holds only the table and the JSON line."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---- Redis -------------------------------------------------------------------


_CHILDREN: list[subprocess.Popen[bytes]] = []


def track(proc: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
    """Kill ``proc`` at interpreter exit if it still runs (a runner killed without unwinding)."""
    _CHILDREN.append(proc)
    return proc


def _kill_children_at_exit() -> None:
    for proc in _CHILDREN:
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.kill()


atexit.register(_kill_children_at_exit)


@contextlib.asynccontextmanager
async def throwaway_redis(timeout_s: float = 10.0) -> AsyncIterator[str]:
    """A ``redis-server`` on a free port, no persistence; stopped on exit. Yields its URL."""
    server = shutil.which("redis-server")
    if server is None:
        raise RuntimeError("redis-server is not installed")
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    proc = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _CHILDREN.append(proc)
    try:
        async def up() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {proc.returncode}")
            return await redis_answers(url, 0.5)

        await wait_until(up, timeout_s, f"redis-server on port {port}")
        yield url
    finally:
        stop_process(proc, 5.0)


def stop_process(proc: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout_s``; returns once it exited."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


# ---- proxies -----------------------------------------------------------------


async def start_daemon(module: str, env: dict[str, str], log_path: Path, url: str, name: str,
                       timeout_s: float) -> subprocess.Popen[bytes]:
    """``python -m <module>`` with its output appended to ``log_path``, once ``url``/healthz answers 200."""
    with open(log_path, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", module], env=env, cwd=REPO_ROOT, stdout=out,
                                stderr=subprocess.STDOUT)
    _CHILDREN.append(proc)
    async with aiohttp.ClientSession() as session:
        async def healthy() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited: {log_path.read_text(errors='replace')[-2000:]}")
            try:
                async with session.get(url + "/healthz", timeout=aiohttp.ClientTimeout(total=1)) as r:
                    return r.status == 200
            except (aiohttp.ClientError, asyncio.TimeoutError):
                return False

        await wait_until(healthy, timeout_s, f"{name} to answer /healthz")
    return proc


class ProxyProcess:
    """One ``python -m runtime_proxy`` subprocess configured by ``LUKEWARM_*``, bound to ``host``: a stack
    gives each proxy its own loopback address (127.0.0.2, .3, …), as hosts of a fleet have their own."""

    def __init__(self, redis_url: str, state_root: Path, runtime: str, proxy_id: str, host: str = "127.0.0.1",
                 **settings: Any) -> None:
        self.host = host
        self.port = free_port(host)
        self.proxy_id = proxy_id
        self.url = f"http://{host}:{self.port}"
        self.state_dir = state_root / proxy_id
        self.env = {
            **os.environ,
            "LUKEWARM_REDIS_URL": redis_url, "LUKEWARM_PROXY_SECRET": SECRET,
            "LUKEWARM_PROXY_HOST": host, "LUKEWARM_PROXY_PORT": str(self.port),
            "LUKEWARM_PROXY_ID": proxy_id, "LUKEWARM_RUNTIME": runtime,
            "LUKEWARM_STATE_DIR": str(self.state_dir), "LUKEWARM_HEARTBEAT_INTERVAL_S": "0.5",
            **{f"LUKEWARM_{k.upper()}": str(v) for k, v in settings.items()},
        }
        self.log_path = state_root / f"{proxy_id}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    async def start(self, timeout_s: float = 30.0) -> None:
        self.proc = await start_daemon("runtime_proxy", self.env, self.log_path, self.url, f"proxy {self.proxy_id}",
                                       timeout_s)

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM (then SIGKILL); replicas of the process runtime it leaves behind are killed too."""
        if self.proc is None:
            return
        children = descendants(self.proc.pid) if self.proc.poll() is None else []
        stop_process(self.proc, timeout_s)
        for pid, started in children:
            if pid != self.proc.pid and started is not None and _start_time(pid) == started:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)

    def kill(self) -> None:
        """SIGKILL: the proxy dies at once, its containers stay (the next start re-adopts them)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    async def state(self, session: aiohttp.ClientSession) -> dict[str, Any]:
        """The proxy's ``GET /internal/v1/state`` (replica ids, states, in-flight)."""
        from shared.signing import derive_key, sign

        headers = sign(derive_key(SECRET), "GET", "/internal/v1/state", b"", time.time())
        async with session.get(self.url + "/internal/v1/state", headers=headers,
                               timeout=aiohttp.ClientTimeout(total=5)) as r:
            r.raise_for_status()
            return dict(await r.json(content_type=None))

    def socket_of(self, replica_id: str) -> Path:
        return self.state_dir / "run" / replica_id / "harness.sock"


class IngressProcess:
    """One ``python -m ingress`` subprocess (a fleet runs several behind a load balancer)."""

    def __init__(self, redis_url: str, log_dir: Path, name: str, **settings: Any) -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "LUKEWARM_REDIS_URL": redis_url, "LUKEWARM_PROXY_SECRET": SECRET, "LUKEWARM_ADMIN_TOKEN": ADMIN,
            "LUKEWARM_INGRESS_HOST": "127.0.0.1", "LUKEWARM_INGRESS_PORT": str(self.port),
            "LUKEWARM_VIEW_POLL_INTERVAL_S": "0.2",
            **{f"LUKEWARM_{k.upper()}": str(v) for k, v in settings.items()},
        }
        self.log_path = log_dir / f"ingress-{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self, timeout_s: float = 30.0) -> None:
        self.proc = await start_daemon("ingress", self.env, self.log_path, self.url, f"ingress {self.name}", timeout_s)

    def terminate(self) -> None:
        """SIGTERM: it stops accepting and drains what is in flight; ``wait`` for the exit."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout_s: float = 60.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout_s)

    def stop(self, timeout_s: float = 15.0) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout_s)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def remove_containers(label: str, timeout_s: float = 60.0) -> None:
    """Remove containers carrying ``label`` (a proxy's stop keeps them for re-adoption)."""
    try:
        ids = subprocess.run(["docker", "ps", "-aq", "--filter", f"label={label}"], capture_output=True,
                             text=True, timeout=30).stdout.split()
        if ids:
            subprocess.run(["docker", "rm", "-f", *ids], capture_output=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log(f"could not remove containers {label}: {exc}")


def _below(root: Path) -> str:
    """The prefix every path under ``root`` starts with (resolved, one trailing slash)."""
    return str(root.resolve()).rstrip("/") + "/"


def kill_processes_below(root: Path) -> int:
    """SIGKILL every process (but this one) whose command line names a file under ``root``: the process
    runtime's harnesses run ``python <state dir>/<proxy>/harness-*.py``. Returns how many."""
    prefix = _below(root)
    killed = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # gone meanwhile, or not ours to read
        if any(arg.decode(errors="replace").startswith(prefix) for arg in args):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(entry.name), signal.SIGKILL)
                killed += 1
    return killed


def unmount_below(root: Path) -> None:
    """Unmount what a proxy left mounted under ``root`` (replicas' socket tmpfs, kept for re-adoption)."""
    prefix = _below(root)
    try:
        with open("/proc/self/mounts") as f:
            points = [line.split()[1] for line in f if line.split()[1].startswith(prefix)]
    except OSError:
        return
    for point in sorted(points, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, timeout=30)


# ---- model images --------------------------------------------------------------


def make_model(runtime: str, name: str, source: str, work_dir: Path, module: str = "model") -> str:
    """A model with ``source`` as ``<module>.py``: an image tag (docker) or ``dir:<path>`` (process).

    The entrypoint to deploy is ``<module>:<function>``.
    """
    ctx = work_dir / f"model-{name}"
    code = ctx / "app"
    code.mkdir(parents=True, exist_ok=True)
    (code / f"{module}.py").write_text(source)
    if runtime == "process":
        return f"dir:{code}"
    from runtime_proxy.docker_runtime import build_image

    (ctx / "Dockerfile").write_text(f"FROM {BASE_IMAGE}\nWORKDIR /app\nCOPY app/ /app/\n")
    tag = f"lukewarm-bench/{name}:latest"
    build_image(str(ctx), tag, timeout_s=120.0)
    return tag


# ---- the stack ---------------------------------------------------------------------


class BenchStack:
    """An ingress (in-process) and proxies (subprocesses) sharing one Redis."""

    def __init__(self, redis_url: str, state_root: Path, runtime: str) -> None:
        self.redis_url = redis_url
        self.state_root = state_root
        self.runtime = runtime
        self.proxies: list[ProxyProcess] = []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.runner: web.AppRunner | None = None
        self.session: aiohttp.ClientSession | None = None
        self.customer_name = ""
        self.key = ""
        self._tag = uuid.uuid4().hex[:6]

    @property
    def app(self) -> web.Application:
        assert self.runner is not None
        return self.runner.app

    async def add_proxy(self, **settings: Any) -> ProxyProcess:
        n = len(self.proxies)
        proxy = ProxyProcess(self.redis_url, self.state_root, self.runtime, f"bp{n}-{self._tag}",
                             host=f"127.0.0.{2 + n}", **settings)
        self.proxies.append(proxy)  # before start: a half-started one is stopped too
        await proxy.start()
        return proxy

    async def start_ingress(self, tls_ca: str = "", **settings: Any) -> None:
        """The ingress in-process, listening exactly as ``python -m ingress`` does (shared.serving:
        connection cap, header deadline, TLS when ``tls_cert``/``tls_key`` are among ``settings``).
        With TLS, ``url`` turns https and the stack's session trusts ``tls_ca`` (a PEM file) only."""
        import ssl

        from ingress.app import build_app
        from shared import serving
        from shared.settings import IngressSettings

        config = IngressSettings(**{
            "redis_url": self.redis_url, "admin_token": ADMIN, "proxy_secret": SECRET,
            "ingress_host": "127.0.0.1", "ingress_port": self.port, "view_poll_interval_s": 0.2, **settings})
        listener = serving.ingress_listener(config)
        self.runner = await serving.start_server(build_app(config), listener)
        self.url = f"{listener.scheme}://127.0.0.1:{self.port}"
        client_ssl = ssl.create_default_context(cafile=tls_ca) if tls_ca else None
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_ssl) if client_ssl else None)

    async def wait_for_proxies(self, count: int, timeout_s: float = 15.0) -> None:
        from ingress import state as ingress_state

        view = self.app[ingress_state.VIEW]
        await wait_until(lambda: len(view.live_proxies()) >= count, timeout_s, f"{count} proxies in the view")

    async def request(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
                      timeout_s: float = 120.0, raw: bytes | None = None) -> tuple[int, Any, Any]:
        """One call; ``raw`` sends those bytes as the body instead of ``body`` as JSON."""
        assert self.session is not None
        kwargs: dict[str, Any] = {"headers": headers or {}, "timeout": aiohttp.ClientTimeout(total=timeout_s)}
        if raw is not None:
            kwargs["data"] = raw
        elif body is not None:
            kwargs["data"] = orjson.dumps(body)
            kwargs["headers"] = {"Content-Type": "application/json", **kwargs["headers"]}
        async with self.session.request(method, self.url + path, **kwargs) as resp:
            data = await resp.read()
            try:
                parsed = orjson.loads(data) if data else None
            except orjson.JSONDecodeError:
                parsed = data
            return resp.status, parsed, resp.headers

    async def admin(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        status, data, _ = await self.request(method, path, body, {"Authorization": f"Bearer {ADMIN}"})
        return status, data

    async def create_customer(self, name: str = "bench", scopes: tuple[str, ...] = ("predict", "deploy")) -> str:
        """Create ``name`` (idempotent) and a key for it; the first becomes the stack's default."""
        status, body = await self.admin("PUT", f"/api/v1/customers/{name}")
        if status not in (200, 201):
            raise RuntimeError(f"create customer {name}: {status} {body}")
        status, body = await self.admin("POST", f"/api/v1/customers/{name}/keys", {"scopes": list(scopes)})
        if status != 201:
            raise RuntimeError(f"create key for {name}: {status} {body}")
        if not self.key:
            self.key, self.customer_name = str(body["key"]), name
        return str(body["key"])

    def model(self, name: str, source: str, module: str = "model") -> str:
        """Build a model from ``source`` for this stack's runtime (blocking; docker takes seconds)."""
        return make_model(self.runtime, name, source, self.state_root, module)

    async def deploy(self, model: str, image: str, entrypoint: str, customer: str | None = None,
                     branch: str = "main", **fields: Any) -> int:
        customer = customer or self.customer_name
        status, body = await self.admin(
            "POST", f"/api/v1/customers/{customer}/models/{model}/branches/{branch}/versions",
            {"image": image, "entrypoint": entrypoint, **fields})
        if status != 201:
            raise RuntimeError(f"deploy {model}: {status} {body}")
        return int(body["version"])

    def call_headers(self, key: str | None = None, customer: str | None = None) -> dict[str, str]:
        return {"Authorization": key or self.key, "Host": f"{customer or self.customer_name}.localhost",
                "Content-Type": "application/json"}

    async def call(self, model: str, data: Any, version: str = "latest", key: str | None = None,
                   customer: str | None = None, timeout_s: float = 120.0) -> tuple[int, Any, Any]:
        assert self.session is not None
        async with self.session.post(f"{self.url}/v1/{model}/{version}", data=orjson.dumps({"data": data}),
                                     headers=self.call_headers(key, customer),
                                     timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            raw = await resp.read()
            try:
                return resp.status, orjson.loads(raw) if raw else None, resp.headers
            except orjson.JSONDecodeError:
                return resp.status, raw, resp.headers

    async def replica_sockets(self, timeout_s: float = 10.0) -> list[tuple[ProxyProcess, str, Path]]:
        """(proxy, replica id, harness socket path) of every running replica, from each proxy's state."""
        assert self.session is not None
        found: list[tuple[ProxyProcess, str, Path]] = []

        async def any_socket() -> bool:
            found.clear()
            for proxy in self.proxies:
                for replica in (await proxy.state(self.session))["replicas"]:  # type: ignore[arg-type]
                    path = proxy.socket_of(replica["replica_id"])
                    if replica.get("state") == "running" and path.exists():
                        found.append((proxy, replica["replica_id"], path))
            return bool(found)

        await wait_until(any_socket, timeout_s, "a running replica with a socket")
        return list(found)

    async def close(self) -> None:
        for proxy in self.proxies:
            proxy.stop()
        if self.session is not None:
            await self.session.close()
        if self.runner is not None:
            await asyncio.wait_for(self.runner.cleanup(), 30)

    async def teardown(self) -> None:
        """``close``, and the containers its proxies leave for re-adoption removed: a benchmark leaves nothing.
        With the process runtime, the harnesses of a proxy killed outright (a fault test) are killed: nothing
        else would, as no proxy comes back to adopt them."""
        try:
            await self.close()
        finally:
            if self.runtime == "docker":
                for proxy in self.proxies:
                    remove_containers(f"lukewarm.proxy={proxy.proxy_id}")
            else:
                kill_processes_below(self.state_root)


@contextlib.asynccontextmanager
async def bench_stack(runtime: str | None = None, proxies: int = 1, own_redis: bool = True,
                      redis_url: str = DEFAULT_REDIS_URL, customer: str | None = "bench",
                      ingress_settings: dict[str, Any] | None = None,
                      **proxy_settings: Any) -> AsyncIterator[BenchStack]:
    """A running stack: Redis (own server unless ``own_redis=False``), ``proxies`` proxies, the ingress,
    and (unless ``customer`` is None) a customer with a key. Everything is torn down on exit."""
    runtime = runtime or default_runtime()
    # Proxies normally leave replicas running for re-adoption; a benchmark leaves nothing behind.
    proxy_settings.setdefault("stop_replicas_on_exit", True)
    state_root = Path(tempfile.mkdtemp(prefix="lwb-", dir="/tmp"))  # short: socket paths < 108 bytes
    async with contextlib.AsyncExitStack() as exits:
        exits.callback(shutil.rmtree, state_root, True)
        exits.callback(unmount_below, state_root)
        if own_redis:
            redis_url = await exits.enter_async_context(throwaway_redis())
        elif not await redis_answers(redis_url):
            raise RuntimeError(f"no Redis answers at {redis_url}")
        stack = BenchStack(redis_url, state_root, runtime)
        exits.push_async_callback(stack.teardown)
        for _ in range(proxies):
            await stack.add_proxy(**proxy_settings)
        await stack.start_ingress(**(ingress_settings or {}))
        await stack.wait_for_proxies(proxies)
        if customer:
            await stack.create_customer(customer)
        yield stack
