"""Hostile customer code against the real stack (docker runtime): every model here tries to
break out of its container or to break the proxy that talks to it.

Each test deploys the attack for customer ``acme`` next to an innocent model of customer
``globex`` (``victim:echo``, which remembers every input it ever saw), and asserts
(1) the caller gets a clear error, or the model's own report shows its attempt failed, and
(2) afterwards the proxy is alive and the other tenant is served, and saw nothing of the attacker.

All hostile code lives in ONE image (``HOSTILE_SOURCE`` as ``hostile.py``, ``VICTIM_SOURCE``
as ``victim.py``). Plain functions probe from inside ``predict``; the env var ``HOSTILE_MODE``
makes the module, at import (in the harness's loader thread), replace the harness:
``os.execv`` drops the harness and every connection the proxy holds to it, then either a
process of ours serves the contract on ``$LUKEWARM_SOCKET`` (answering ``GET /ready`` properly,
hostile on ``POST /predict``), or, for the ``symlink`` mode, ``$LUKEWARM_SOCKET`` is now a
symlink to ``$TARGET`` (another tenant's socket or the Docker socket, as HOST paths) and
nothing listens in the container at all.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import pytest

from tests.support.stack import ADMIN, BASE_IMAGE, SECRET, ProxyProcess, Stack, running_stack, wait_until

pytestmark = [pytest.mark.security, pytest.mark.docker, pytest.mark.timeout(300)]

HOSTILE_IMAGE = "lukewarm-test/hostile:latest"
# Hostile versions get a short deadline of their own: a defence that is missing shows as a 504
# at this deadline instead of a hang, and "no hang" below means well under it.
HOSTILE_TIMEOUT_S = 15
QUICK_S = 8.0
# What the proxy and the host hold and no container may ever see.
HOST_MARKERS = (SECRET, ADMIN, "LUKEWARM_PROXY_SECRET", "LUKEWARM_REDIS_URL", "runtime_proxy",
                "redis-server", "dockerd", "containerd", "victim:echo")

VICTIM_SOURCE = '''
"""An innocent tenant: echoes, and remembers every input it ever saw (an attacker's too)."""
SEEN = []


def echo(x):
    SEEN.append(x)
    print(f"victim saw {x!r}")
    return {"echo": x, "seen": list(SEEN)}
'''

HOSTILE_SOURCE = r'''
"""Hostile customer code (stdlib only). See tests/security/test_hostile_models.py."""
import errno
import os
import signal
import socket
import subprocess
import sys
import threading
import time

MB = 1 << 20


def _errname(exc):
    return errno.errorcode.get(getattr(exc, "errno", None) or 0, type(exc).__name__)


def _attempt(fn):
    """{"ok": True, "value": ...} or {"ok": False, "error": "ENOENT", "detail": ...}."""
    try:
        return {"ok": True, "value": fn()}
    except BaseException as exc:  # report everything: the caller judges
        return {"ok": False, "error": _errname(exc), "detail": f"{type(exc).__name__}: {exc}"[:300]}


def echo(x):
    return x


# ---- probes run inside predict ------------------------------------------------------

def network(x):
    out = {}
    for host, port in x["targets"]:
        def connect(host=host, port=port):
            with socket.create_connection((host, port), timeout=3) as s:
                return list(s.getpeername())
        out[f"{host}:{port}"] = _attempt(connect)
    out["dns"] = _attempt(lambda: len(socket.getaddrinfo("example.com", 443)))
    out["interfaces"] = sorted(name for _, name in socket.if_nameindex())
    return out


def write_root(x):
    out = {}
    for d in x["dirs"]:
        def write(d=d):
            path = os.path.join(d, "lukewarm-hostile-was-here")
            with open(path, "wb") as f:
                f.write(b"pwned")
            return path
        out[d] = _attempt(write)
    return out


def fill(x):
    """Write x["mb"] MiB into x["dir"]; how far it got and why it stopped."""
    path = os.path.join(x["dir"], "lukewarm-hostile-fill")
    block = b"\xab" * MB
    written, error = 0, None
    try:
        with open(path, "wb", buffering=0) as f:
            while written < int(x["mb"]) * MB:
                written += f.write(block)
    except OSError as exc:
        error = _errname(exc)
    if not x.get("keep"):
        try:
            os.unlink(path)
        except OSError:
            pass
    return {"written_mb": round(written / MB, 2), "error": error}


def _procs():
    return sum(1 for d in os.listdir("/proc") if d.isdigit())


def fork_bomb(x):
    """A real fork bomb (every process forks forever) in its own process group, for x["seconds"]."""
    base = _procs()
    child = os.fork()
    if child == 0:
        try:
            os.setpgid(0, 0)
            while True:
                try:
                    os.fork()
                except OSError:
                    time.sleep(0.01)
        finally:
            os._exit(0)
    try:
        os.setpgid(child, child)
    except OSError:
        pass
    peak = base
    end = time.monotonic() + float(x["seconds"])
    while time.monotonic() < end:
        peak = max(peak, _procs())
        time.sleep(0.05)
    fork_error = None
    try:  # at the peak, we cannot fork either
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
    except OSError as exc:
        fork_error = _errname(exc)
    os.killpg(child, signal.SIGKILL)
    os.waitpid(child, 0)
    end = time.monotonic() + 15  # the orphans are reaped by the container's init
    while _procs() > base and time.monotonic() < end:
        time.sleep(0.05)
    return {"base": base, "peak": peak, "fork_error_at_peak": fork_error, "after": _procs()}


def spawn(x):
    """subprocess.Popen until it fails."""
    procs, error = [], None
    try:
        while len(procs) < int(x["max"]):
            procs.append(subprocess.Popen(["sleep", "60"]))
    except OSError as exc:
        error = _errname(exc)
    spawned = len(procs)
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()
    return {"spawned": spawned, "error": error}


def hog(x):
    blocks = []
    for _ in range(int(x)):
        blocks.append(b"\x01" * (16 * MB))  # written, so really resident
    return len(blocks)


def snoop(x):
    out = {}
    for path in x["sockets"]:
        def connect(path=path):
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(3)
                s.connect(path)
                s.sendall(b"GET /ready HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
                return s.recv(300).decode("latin-1")
        out["connect " + path] = _attempt(connect)
    for path in x["files"]:
        def read(path=path):
            with open(path, "rb") as f:
                return f.read(65536).decode("latin-1")
        out["read " + path] = _attempt(read)
    for path in x["dirs"]:
        out["list " + path] = _attempt(lambda path=path: sorted(os.listdir(path)))
    seen, pids = [], sorted(d for d in os.listdir("/proc") if d.isdigit())
    for pid in pids:
        for what in ("cmdline", "environ"):
            try:
                with open(f"/proc/{pid}/{what}", "rb") as f:
                    seen.append(f.read().replace(b"\0", b" ").decode("latin-1"))
            except OSError:
                pass
    text = "\n".join(seen)
    out["pids"] = pids
    out["markers"] = [m for m in x["markers"] if m in text]
    return out


# ---- serving the contract ourselves (after the harness is gone) -----------------------

READY = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 14\r\n\r\n{"ready":true}'
OK_HEAD = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"


def _pump(conn, head, piece, cap_mb):
    """Send head, then piece again and again, up to cap_mb MiB (the proxy may hang up first)."""
    conn.sendall(head)
    sent = 0
    while sent < cap_mb * MB:
        conn.sendall(piece)
        sent += len(piece)


def _huge_length(conn):
    conn.sendall((OK_HEAD + "Content-Length: 10000000000\r\n\r\n").encode() + b'{"outputs":[')


def _chunked_stream(conn):
    head = (OK_HEAD + "Transfer-Encoding: chunked\r\n\r\n").encode()
    _pump(conn, head, b"100000\r\n" + b" " * MB + b"\r\n", 600)


def _close_delimited(conn):
    _pump(conn, (OK_HEAD + "Connection: close\r\n\r\n").encode(), b" " * MB, 600)


def _dribble(conn):
    answer = (OK_HEAD + "Content-Length: 1000000\r\n\r\n").encode() + b'{"outputs":[' + b" " * 999988
    for i in range(len(answer)):
        conn.sendall(answer[i:i + 1])
        time.sleep(0.1)


def _random(conn):
    conn.sendall(b"\x00\xff\xfe\r\n" + os.urandom(8192))


def _bad_status(conn):
    conn.sendall(b"HTTP/1.1 OK-ish banana\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")


def _endless_headers(conn):
    _pump(conn, b"HTTP/1.1 200 OK\r\n", (b"X-Junk: " + b"j" * 54 + b"\r\n") * 16384, 200)


def _huge_header(conn):
    _pump(conn, b"HTTP/1.1 200 OK\r\nX-Big: ", b"a" * MB, 200)


def _deep_json(conn):
    body = b"[" * 100000 + b"]" * 100000
    conn.sendall((OK_HEAD + f"Content-Length: {len(body)}\r\n\r\n").encode() + body)


def _chunked_endless(conn):
    head = (OK_HEAD + "Transfer-Encoding: chunked\r\n\r\n").encode() + b'c\r\n{"outputs":[\r\n'
    _pump(conn, head, b"10000\r\n" + b" " * 0x10000 + b"\r\n", 200)


ANSWERS = {"huge_length": _huge_length, "chunked_stream": _chunked_stream, "close_delimited": _close_delimited,
           "dribble": _dribble,
           "random": _random, "bad_status": _bad_status, "endless_headers": _endless_headers,
           "huge_header": _huge_header, "deep_json": _deep_json, "chunked_endless": _chunked_endless}


def _read_request(reader):
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        line = reader.readline(65536)
        if not line:
            return None
        head += line
    lines = head.decode("latin-1").split("\r\n")
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    if length:
        reader.read(length)
    return lines[0].split(" ")[1]


def _connection(conn, mode):
    try:
        reader = conn.makefile("rb")
        while True:
            target = _read_request(reader)
            if target is None:
                return
            if target.startswith("/ready"):
                conn.sendall(READY)
                continue
            ANSWERS[mode](conn)
            while conn.recv(65536):  # hold the connection open until the proxy hangs up
                pass
            return
    except OSError:
        pass  # the proxy hung up on us: good
    finally:
        conn.close()


def serve(mode):
    path = os.environ["LUKEWARM_SOCKET"]
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    os.chmod(path, 0o666)
    srv.listen(64)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=_connection, args=(conn, mode), daemon=True).start()


def hijack(mode):
    """Replace the harness (exec closes its sockets, so every proxy connection to it breaks)."""
    if mode == "symlink":
        path = os.environ["LUKEWARM_SOCKET"]
        os.unlink(path)
        os.symlink(os.environ["TARGET"], path)
        os.execv(sys.executable, [sys.executable, "-c", "import time\nwhile True: time.sleep(3600)"])
    os.execv(sys.executable, [sys.executable, os.path.abspath(__file__), mode])


if __name__ == "__main__":
    serve(sys.argv[1])
elif os.environ.get("HOSTILE_MODE"):
    hijack(os.environ["HOSTILE_MODE"])
'''


# ---- fixtures and helpers ---------------------------------------------------------------


@pytest.fixture(scope="session")
def hostile_image(docker_engine: None, tmp_path_factory: pytest.TempPathFactory) -> str:
    from runtime_proxy.docker_runtime import build_image

    ctx = tmp_path_factory.mktemp("hostile")
    (ctx / "Dockerfile").write_text(f"FROM {BASE_IMAGE}\nWORKDIR /app\nCOPY app/ /app/\n")
    (ctx / "app").mkdir()
    (ctx / "app" / "hostile.py").write_text(HOSTILE_SOURCE)
    (ctx / "app" / "victim.py").write_text(VICTIM_SOURCE)
    build_image(str(ctx), HOSTILE_IMAGE, timeout_s=300)
    return HOSTILE_IMAGE


@dataclasses.dataclass
class Outcome:
    status: int
    body: Any
    elapsed_s: float

    @property
    def type(self) -> str | None:
        return self.body.get("type") if isinstance(self.body, dict) else None

    def __str__(self) -> str:
        return f"{self.status} {str(self.body)[:300]} after {self.elapsed_s:.1f} s"


@dataclasses.dataclass
class Arena:
    """A stack with an attacker (``acme``, the stack's default key) and a victim tenant (``globex``)."""

    stack: Stack
    image: str
    victim_key: str
    victim_calls: int = 0

    @property
    def proxy(self) -> ProxyProcess:
        return self.stack.proxies[0]

    async def deploy(self, model: str, entrypoint: str = "hostile:echo", mode: str | None = None,
                     **fields: Any) -> None:
        env = dict(fields.pop("env", {}))
        if mode is not None:
            env["HOSTILE_MODE"] = mode
            fields.setdefault("timeout_s", HOSTILE_TIMEOUT_S)
        await self.stack.deploy(model, self.image, entrypoint, customer="acme", env=env, **fields)

    async def attack(self, model: str, data: Any, timeout_s: float = 120.0, **extra: Any) -> Outcome:
        t0 = time.monotonic()
        status, body, _ = await self.stack.call(model, data, customer="acme", extra=extra, timeout_s=timeout_s)
        return Outcome(status, body, time.monotonic() - t0)

    async def victim_serves(self, within_s: float = 10.0) -> list[Any]:
        """One call of the other tenant: answered, promptly, with its own data; what it has seen."""
        self.victim_calls += 1
        marker = f"victim-{self.victim_calls}"
        t0 = time.monotonic()
        status, body, _ = await self.stack.call("victim", marker, key=self.victim_key, customer="globex",
                                                timeout_s=within_s + 20)
        elapsed = time.monotonic() - t0
        assert status == 200 and body["data"]["echo"] == marker, body
        assert elapsed < within_s, f"the other tenant waited {elapsed:.1f} s"
        return list(body["data"]["seen"])

    async def still_serving(self) -> None:
        """The proxy is alive and healthy; the other tenant is served and never saw the attacker."""
        assert self.proxy.proc is not None and self.proxy.proc.poll() is None, self.proxy.log()[-3000:]
        assert self.stack.session is not None
        async with self.stack.session.get(self.proxy.url + "/healthz") as resp:
            assert resp.status == 200
        seen = await self.victim_serves()
        strangers = [s for s in seen if not (isinstance(s, str) and s.startswith("victim-"))]
        assert strangers == [], f"the other tenant's model was given the attacker's inputs: {strangers}"
        status, logs = await self.stack.admin("GET", "/api/v1/customers/globex/models/victim/branches/main/logs"
                                                     "?limit=200")
        assert status == 200, logs
        for entry in logs["logs"]:
            for line in (entry.get("stdout") or "").splitlines():
                assert line.startswith("victim saw 'victim-"), f"a stranger's request in the victim's log: {entry}"


@pytest.fixture
async def arena(redis_url: str, state_dir: Path, hostile_image: str) -> AsyncIterator[Arena]:
    try:
        async with running_stack(redis_url, state_dir, "docker") as stack:
            await stack.customer("acme")
            victim_key = await stack.customer("globex", scopes=("predict",))
            await stack.deploy("victim", hostile_image, "victim:echo", customer="globex")
            arena = Arena(stack, hostile_image, victim_key)
            await arena.victim_serves(within_s=60)  # cold start: its replica and socket exist from here on
            yield arena
    finally:
        unmount_under(state_dir)


def unmount_under(root: Path) -> None:
    """Unmount what our proxies mounted under ``root`` (replica socket dirs) and left behind when
    their containers were removed by label, so that ``state_dir``'s removal can finish."""
    prefix = str(root).rstrip("/") + "/"
    points = [p for p, _ in mounts() if p.startswith(prefix)]
    for point in sorted(points, key=len, reverse=True):
        subprocess.run(["umount", point], capture_output=True, timeout=30, check=False)


async def replica_of(stack: Stack, version_key: str) -> tuple[ProxyProcess, str]:
    """The proxy and replica id of ``version_key``'s running replica."""
    assert stack.session is not None
    found: list[tuple[ProxyProcess, str]] = []

    async def running() -> bool:
        for proxy in stack.proxies:
            for replica in (await proxy.state(stack.session))["replicas"]:  # type: ignore[arg-type]
                if replica["version"] == version_key and replica["state"] == "running":
                    found.append((proxy, replica["replica_id"]))
        return bool(found)

    await wait_until(running, 10, f"a running replica of {version_key}")
    return found[0]


def failed(attempt: dict[str, Any], *errors: str) -> bool:
    """The model's attempt failed (with one of ``errors`` when given)."""
    return attempt["ok"] is False and (not errors or attempt["error"] in errors)


def mounts() -> list[tuple[str, str]]:
    """(mount point, file system type) of every mount, from /proc/self/mountinfo."""
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        out.append((left.split()[4].encode().decode("unicode_escape"), right.split()[0]))
    return out


def mount_of(path: Path) -> tuple[str, str]:
    """(mount point, file system type) of the mount ``path`` lives on."""
    target = str(path).rstrip("/") + "/"
    best = ("", "")
    for point, fstype in mounts():
        if target.startswith(point.rstrip("/") + "/") and len(point) >= len(best[0]):
            best = (point, fstype)
    return best


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@contextlib.asynccontextmanager
async def peak_rss_mb(pid: int) -> AsyncIterator[list[float]]:
    """Samples ``pid``'s resident memory every 20 ms; yields a one-item list holding the peak so far."""
    peak = [rss_mb(pid)]

    async def sample() -> None:
        while True:
            peak[0] = max(peak[0], rss_mb(pid))
            await asyncio.sleep(0.02)

    task = asyncio.create_task(sample())
    try:
        yield peak
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        peak[0] = max(peak[0], rss_mb(pid))


async def victim_served_while(arena: Arena, call: Awaitable[Outcome]) -> tuple[Outcome, int]:
    """Run ``call`` and serve the other tenant over and over until it is answered."""
    task = asyncio.ensure_future(call)
    served = 0
    try:
        while not task.done():
            await arena.victim_serves(within_s=8.0)
            served += 1
            await asyncio.wait({task}, timeout=0.2)
        return await task, served
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def host_address() -> str | None:
    """This host's outbound address (no packet is sent), if it has a route at all."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("1.1.1.1", 53))
            return str(s.getsockname()[0])
        except OSError:
            return None


# ---- 1. network ---------------------------------------------------------------------------


async def test_no_network_from_the_container(arena: Arena) -> None:
    port = arena.proxy.port
    targets = [["1.1.1.1", 53], ["127.0.0.1", 6379], ["127.0.0.1", port], ["172.17.0.1", 6379],
               ["172.17.0.1", port]]
    if (addr := host_address()) is not None:
        targets += [[addr, 6379], [addr, port]]
    await arena.deploy("net", "hostile:network")
    out = await arena.attack("net", {"targets": targets})
    assert out.status == 200, out
    report = out.body["data"]
    assert report["interfaces"] == ["lo"], report
    assert failed(report["dns"]), report["dns"]
    for host, p in targets:
        assert failed(report[f"{host}:{p}"]), (f"{host}:{p}", report[f"{host}:{p}"])
    await arena.still_serving()


# ---- 2. the root file system and /tmp -------------------------------------------------------


async def test_root_filesystem_is_read_only_and_tmp_is_small(arena: Arena) -> None:
    await arena.deploy("rootfs", "hostile:write_root")
    out = await arena.attack("rootfs", {"dirs": ["/", "/app", "/usr", "/etc", "/lukewarm"]})
    assert out.status == 200, out
    for d, attempt in out.body["data"].items():
        assert failed(attempt, "EROFS", "EACCES"), (d, attempt)

    await arena.deploy("tmpfill", "hostile:fill")
    out = await arena.attack("tmpfill", {"dir": "/tmp", "mb": 100})
    assert out.status == 200, out
    assert out.body["data"]["error"] == "ENOSPC", out
    assert out.body["data"]["written_mb"] <= 64, out
    await arena.still_serving()


# ---- 3. the socket directory, the one host path it can write ---------------------------------


async def test_socket_directory_is_a_small_tmpfs(arena: Arena) -> None:
    await arena.deploy("runfill", "hostile:fill")
    out = await arena.attack("runfill", {"dir": "/lukewarm/run", "mb": 50, "keep": True})
    assert out.status == 200, out
    report = out.body["data"]
    proxy, rid = await replica_of(arena.stack, "acme/runfill/main/1")
    run_dir = proxy.socket_of(rid).parent
    on_host = sum(f.stat().st_blocks * 512 for f in run_dir.iterdir() if f.is_file()) / 2**20
    point, fstype = mount_of(run_dir)
    assert report["error"] == "ENOSPC" and report["written_mb"] <= 2, (
        f"the model wrote {report['written_mb']} MiB into its socket directory ({report['error']}); "
        f"{on_host:.1f} MiB of it on the host under {run_dir}, a {fstype} mounted at {point}")
    assert on_host <= 2
    assert fstype == "tmpfs" and point.startswith(str(proxy.state_dir)), (point, fstype)
    await arena.still_serving()


# ---- 4. forks ---------------------------------------------------------------------------------


async def test_fork_bomb_is_bounded_by_the_pids_limit(arena: Arena) -> None:
    await arena.deploy("forkbomb", "hostile:fork_bomb", memory_mb=1024)
    out, served = await victim_served_while(arena, arena.attack("forkbomb", {"seconds": 4}))
    assert served >= 1
    if out.status == 200:
        report = out.body["data"]
        assert report["peak"] <= 256 and report["fork_error_at_peak"] == "EAGAIN", report
    else:
        assert out.status in (502, 504) and out.type in {"model_crashed", "oom", "timeout"}, out

    await arena.deploy("spawner", "hostile:spawn")
    out = await arena.attack("spawner", {"max": 5000})
    assert out.status == 200, out
    report = out.body["data"]
    assert report["spawned"] < 256 and report["error"] == "EAGAIN", report
    assert subprocess.run(["true"], timeout=10).returncode == 0, "the host can still fork"
    await arena.still_serving()


# ---- 5. memory --------------------------------------------------------------------------------


async def test_memory_balloon_is_oom(arena: Arena) -> None:
    await arena.deploy("balloon", "hostile:hog", memory_mb=128)
    out = await arena.attack("balloon", 64)  # 1 GiB into 128 MiB
    assert out.status == 502 and out.type == "oom", out
    assert (await arena.attack("balloon", 1)).status == 200, "a fresh replica serves the next call"
    await arena.still_serving()


# ---- 6. other tenants' sockets, the host's files ------------------------------------------------


async def test_nothing_of_the_host_or_other_replicas_is_reachable(arena: Arena) -> None:
    victim_proxy, victim_rid = await replica_of(arena.stack, "globex/victim/main/1")
    victim_socket = str(victim_proxy.socket_of(victim_rid))
    state_root = str(arena.stack.state_root)
    await arena.deploy("snoop", "hostile:snoop")
    out = await arena.attack("snoop", {
        "sockets": [victim_socket, f"/lukewarm/run/../{victim_rid}/harness.sock", "/var/run/docker.sock",
                    "/run/docker.sock", "/run/containerd/containerd.sock"],
        "files": ["/etc/shadow", "/proc/1/root/etc/shadow", "/proc/1/environ",
                  str(victim_proxy.log_path), victim_socket],
        "dirs": ["/lukewarm/run", "/lukewarm", state_root, str(victim_proxy.state_dir / "run")],
        "markers": list(HOST_MARKERS),
    })
    assert out.status == 200, out
    report = out.body["data"]
    assert report["list /lukewarm/run"] == {"ok": True, "value": ["harness.sock"]}, report["list /lukewarm/run"]
    assert report["list /lukewarm"]["value"] == ["harness.py", "run"], report["list /lukewarm"]
    for key in ("list " + state_root, "list " + str(victim_proxy.state_dir / "run")):
        assert failed(report[key], "ENOENT"), (key, report[key])
    for key, attempt in report.items():
        if key.startswith("connect "):
            assert failed(attempt), (key, attempt)
    for path in ("/etc/shadow", "/proc/1/root/etc/shadow"):
        assert failed(report["read " + path], "EACCES"), (path, report["read " + path])
    for path in (str(victim_proxy.log_path), victim_socket):
        assert failed(report["read " + path], "ENOENT"), (path, report["read " + path])
    environ = report["read /proc/1/environ"]
    assert failed(environ) or not any(m in environ["value"] for m in HOST_MARKERS), environ
    assert report["markers"] == [], f"the container sees host or other tenants' processes: {report['markers']}"
    await arena.still_serving()


# ---- 7. a socket swapped for a symlink --------------------------------------------------------


async def test_socket_symlinked_to_another_tenants_socket(arena: Arena) -> None:
    victim_proxy, victim_rid = await replica_of(arena.stack, "globex/victim/main/1")
    target = str(victim_proxy.socket_of(victim_rid))
    await arena.deploy("hijack", mode="symlink", env={"TARGET": target})
    out = await arena.attack("hijack", "attack-symlink")
    assert out.status == 502 and out.type in {"bad_model_response", "model_crashed"}, (
        f"the proxy followed the symlink to the other tenant's socket {target}: {out}")
    assert "victim" not in str(out.body), out
    await arena.still_serving()


async def test_socket_symlinked_to_the_docker_socket(arena: Arena) -> None:
    await arena.deploy("dockerjack", mode="symlink", env={"TARGET": "/var/run/docker.sock"})
    out = await arena.attack("dockerjack", "attack-docker")
    assert out.status == 502 and out.type in {"bad_model_response", "model_crashed"}, (
        f"the proxy talked to Docker through the symlink: {out}")
    assert "page not found" not in str(out.body), out
    await arena.still_serving()


# ---- 8. a 10 GB answer ---------------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "types"), [
    ("huge_length", {"response_too_large"}),
    ("chunked_stream", {"response_too_large"}),
    # Framed by nothing but the end of the connection: refusing the framing is fine too.
    ("close_delimited", {"response_too_large", "bad_model_response"}),
])
async def test_huge_answer_is_cut_off_without_ballooning_the_proxy(arena: Arena, mode: str, types: set[str]) -> None:
    """huge_length announces 10 GB (Content-Length) and sends 12 bytes; the other two stream
    600 MB as fast as the socket takes it (chunked, or until the connection closes)."""
    pid = arena.proxy.pid
    assert pid is not None
    await arena.deploy("big", mode=mode, capacity={"min": 1})
    async with peak_rss_mb(pid) as peak:
        out = await arena.attack("big", "attack-big")
    assert out.status == 502 and out.type in types, out
    assert out.elapsed_s < QUICK_S, out
    assert peak[0] < 500, f"the proxy's resident memory peaked at {peak[0]:.0f} MiB"
    await arena.still_serving()


# ---- 9. an answer dribbled a byte at a time ----------------------------------------------------


async def test_dribbled_answer_times_out_at_the_callers_deadline(arena: Arena) -> None:
    await arena.deploy("dribble", mode="dribble", capacity={"min": 1})
    out, served = await victim_served_while(arena, arena.attack("dribble", "attack-dribble", timeout_seconds=3))
    assert out.status == 504 and out.type == "timeout", out
    assert 2.5 <= out.elapsed_s < 10, out
    assert served >= 3, "the other tenant was served while the dribble went on"
    await arena.still_serving()


# ---- 10. garbage answers ----------------------------------------------------------------------------

GARBAGE = {
    "random": {"bad_model_response"},
    "bad_status": {"bad_model_response"},
    "deep_json": {"bad_model_response"},
    "endless_headers": {"bad_model_response", "response_too_large"},
    "huge_header": {"bad_model_response", "response_too_large"},
    "chunked_endless": {"bad_model_response", "response_too_large"},
}


async def test_garbage_answers_are_bad_model_responses(arena: Arena) -> None:
    names = {mode: "garbage-" + mode.replace("_", "-") for mode in GARBAGE}
    for mode, name in names.items():
        await arena.deploy(name, mode=mode, capacity={"min": 1})
    outcomes = await asyncio.gather(*(arena.attack(name, "attack-garbage") for name in names.values()))
    results = dict(zip(GARBAGE, outcomes))
    wrong = {mode: str(out) for mode, out in results.items()
             if not (out.status == 502 and out.type in GARBAGE[mode] and out.elapsed_s < QUICK_S)}
    assert wrong == {}, "answers that were not a quick 502 of the expected type:\n" + "\n".join(
        f"  {mode}: {text}" for mode, text in wrong.items())
    await arena.still_serving()
