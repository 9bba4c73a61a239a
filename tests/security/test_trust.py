"""The trust boundaries of DESIGN.md ("Contract, second part": Trust), tried as an attacker would,
against the real stack: a real Redis, real proxies (subprocesses), real containers.

Hostile model code lives in test_hostile_models.py; HTTPS in test_https.py; Redis roles in
test_redis_acl.py; fuzzing in test_fuzz.py. Here: what a customer key, a sniffer on the proxy
hop and a careless operator can and cannot do.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aredis

from shared import keys
from shared.signing import derive_key, sign
from tests.support.stack import REPO_ROOT, SECRET, Stack, free_port, running_stack, wait_until

pytestmark = [pytest.mark.security, pytest.mark.timeout(240)]

VERSIONS = "/api/v1/customers/{c}/models/{m}/branches/main/versions"


@contextlib.asynccontextmanager
async def process_stack(redis_url: str, state_dir: Path, ingress: dict[str, Any] | None = None,
                        **proxy: Any) -> AsyncIterator[Stack]:
    """A stack on the process runtime (named: it never runs otherwise), customer acme, an echo model."""
    async with running_stack(redis_url, state_dir, "process", ingress=ingress, **proxy) as s:
        await s.customer("acme")
        s.image = f"dir:{REPO_ROOT / 'tests' / 'support' / 'models'}"
        yield s


@pytest.fixture
async def stack(redis_url: str, state_dir: Path) -> AsyncIterator[Stack]:
    async with process_stack(redis_url, state_dir) as s:
        yield s


async def new_key(stack: Stack, customer: str, scopes: list[str], token: str | None = None,
                  **extra: Any) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {"Authorization": f"Bearer {stack_admin()}"}
    status, body, _ = await stack.request("POST", f"/api/v1/customers/{customer}/keys",
                                          {"scopes": scopes, **extra}, headers)
    return status, body


def stack_admin() -> str:
    from tests.support.stack import ADMIN

    return ADMIN


# ---- the daemons refuse unsafe configurations --------------------------------------------------

def run_proxy(env: dict[str, str], timeout_s: float = 30) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "LUKEWARM_PROXY_SECRET": "x", "LUKEWARM_PROXY_PORT": str(free_port()), **env}
    return subprocess.run([sys.executable, "-m", "runtime_proxy"], env=full, cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout_s)


def test_runtime_auto_without_a_docker_engine_exits_instead_of_running_processes(tmp_path: Path) -> None:
    """Falling back to the process runtime gave a deploy key a root shell (`image: "/"`, `os:system`)."""
    done = run_proxy({"LUKEWARM_RUNTIME": "auto", "DOCKER_HOST": f"unix://{tmp_path}/no-docker.sock",
                      "LUKEWARM_STATE_DIR": str(tmp_path)})
    assert done.returncode != 0
    assert "no Docker engine answers" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("host", ["0.0.0.0", "10.0.0.5"])
def test_binding_beyond_loopback_without_an_advertise_url_fails_fast(host: str, tmp_path: Path) -> None:
    done = run_proxy({"LUKEWARM_RUNTIME": "process", "LUKEWARM_PROXY_HOST": host, "LUKEWARM_STATE_DIR": str(tmp_path)})
    assert done.returncode != 0
    assert "LUKEWARM_ADVERTISE_URL" in done.stderr and "Traceback" not in done.stderr


# ---- the proxy hop -----------------------------------------------------------------------------

async def proxy_post(session: aiohttp.ClientSession, url: str, path: str, body: bytes,
                     headers: dict[str, str]) -> tuple[int, Any]:
    async with session.post(url + path, data=body, headers=headers, timeout=aiohttp.ClientTimeout(total=60)) as r:
        return r.status, orjson.loads(await r.read())


async def test_the_proxy_refuses_unsigned_forged_stale_and_replayed_calls(stack: Stack) -> None:
    proxy = stack.proxies[0]
    version = await stack.deploy("echo", stack.image, "models:echo")
    created_at = (await stack.admin("GET", VERSIONS.format(c="acme", m="echo") + f"/{version}"))[1]["created_at"]
    path = "/internal/v1/chunks"
    body = orjson.dumps({"version": f"acme/echo/main/{version}", "created_at": created_at, "inputs": [1],
                         "timeout_s": 30, "request_id": "t"})
    key = derive_key(SECRET)
    assert stack.session is not None
    signed = sign(key, "POST", path, body, time.time())
    status, answer = await proxy_post(stack.session, proxy.url, path, body, signed)
    assert status == 200 and answer["outputs"] == [{"echo": 1}], answer
    refused = {
        "replayed": signed,
        "the old bearer secret": {"Authorization": f"Bearer {SECRET}"},
        "unsigned": {},
        "stale": sign(key, "POST", path, body, time.time() - 120),
        "another body": sign(key, "POST", path, body.replace(b"[1]", b"[2]"), time.time()),
        "signed with the secret itself": sign(SECRET.encode(), "POST", path, body, time.time()),
    }
    for what, headers in refused.items():
        status, answer = await proxy_post(stack.session, proxy.url, path, body, headers)
        assert (status, answer["type"]) == (401, "unauthorized"), what


async def test_the_proxy_runs_what_the_registry_says_not_what_the_body_says(stack: Stack) -> None:
    """A chunk names a version; image, entrypoint and env come from the registry, never from the caller."""
    proxy = stack.proxies[0]
    version = await stack.deploy("echo", stack.image, "models:echo")
    created_at = (await stack.admin("GET", VERSIONS.format(c="acme", m="echo") + f"/{version}"))[1]["created_at"]
    path = "/internal/v1/chunks"
    key = derive_key(SECRET)
    assert stack.session is not None

    async def chunk(**fields: Any) -> tuple[int, Any]:
        body = orjson.dumps({"version": f"acme/echo/main/{version}", "created_at": created_at, "inputs": ["x"],
                             "timeout_s": 30, **fields})
        return await proxy_post(stack.session, proxy.url, path, body,  # type: ignore[arg-type]
                                sign(key, "POST", path, body, time.time()))

    evil = {"image": "dir:/", "entrypoint": "os:system", "env": {"X": "1"}}
    status, answer = await chunk(spec=evil, image="dir:/", entrypoint="os:system")
    assert status == 200 and answer["outputs"] == [{"echo": "x"}], answer
    status, answer = await chunk(version="acme/echo/main/99")
    assert (status, answer["type"]) == (404, "not_found")
    status, answer = await chunk(created_at=created_at + 1)
    assert (status, answer["type"]) == (503, "version_changed")
    assert (await stack.admin("DELETE", VERSIONS.format(c="acme", m="echo") + f"/{version}"))[0] == 204

    async def refused() -> bool:
        return (await chunk())[0] == 404

    await wait_until(refused, 15, "the proxy to see the version retired")


# ---- customer keys -----------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("image", "status", "kind"),
    [
        ("/", 400, "invalid_image"),
        ("dir:/etc", 400, "invalid_image"),
        ("../../etc", 400, "invalid_image"),
        ("lukewarm-globex/secret-model:1", 403, "image_not_allowed"),
        ("lukewarm-acmeevil/x", 403, "image_not_allowed"),
        ("python:3", 403, "image_not_allowed"),
        ("lukewarm/python:bookworm", 403, "image_not_allowed"),  # not listed as shared here
    ],
)
async def test_a_customer_key_deploys_only_its_own_images(stack: Stack, image: str, status: int, kind: str) -> None:
    status_, body, _ = await stack.request(
        "POST", VERSIONS.format(c="acme", m="evil"), {"image": image, "entrypoint": "os:system"},
        {"Authorization": stack.key})
    assert (status_, body["type"]) == (status, kind), body
    # A refused deploy uses no version number.
    assert await stack.deploy("evil", stack.image, "models:echo") == 1


async def test_deploy_keys_cannot_mint_deploy_keys(stack: Stack) -> None:
    status, body = await new_key(stack, "acme", ["predict", "deploy"], token=stack.key)
    assert (status, body["type"]) == (403, "forbidden")
    status, body = await new_key(stack, "acme", ["predict"], token=stack.key)
    assert status == 201 and body["scopes"] == ["predict"]
    status, body = await new_key(stack, "acme", ["deploy"])  # the admin may
    assert status == 201


async def test_an_expiring_key_stops_working(stack: Stack) -> None:
    await stack.deploy("echo", stack.image, "models:echo")
    status, body = await new_key(stack, "acme", ["predict"], expires_in_s=2)
    assert status == 201 and body["expires_at"] > time.time()
    key = body["key"]
    assert (await stack.call("echo", 1, key=key))[0] == 200
    await wait_until(lambda: _status(stack.call("echo", 1, key=key)), 15, "the key to expire")


async def _status(pending: Any, wanted: int = 401) -> bool:
    return (await pending)[0] == wanted


async def test_revocation_reaches_every_ingress_within_a_second(stack: Stack) -> None:
    await stack.deploy("echo", stack.image, "models:echo")
    _, body = await new_key(stack, "acme", ["predict"])
    assert (await stack.call("echo", 1, key=body["key"]))[0] == 200
    status, _ = await stack.admin("DELETE", f"/api/v1/customers/acme/keys/{body['id']}")
    assert status == 204
    t0 = time.monotonic()
    await wait_until(lambda: _status(stack.call("echo", 1, key=body["key"])), 1.0, "the key to stop working")
    assert time.monotonic() - t0 <= 1.0


async def test_revocation_holds_when_the_pubsub_message_is_lost(redis_url: str, state_dir: Path) -> None:
    """A key deleted in Redis without any event (a message lost): cached keys are read again."""
    async with process_stack(redis_url, state_dir, ingress={"key_cache_s": 1.0}) as stack:
        await stack.deploy("echo", stack.image, "models:echo")
        _, body = await new_key(stack, "acme", ["predict"])
        assert (await stack.call("echo", 1, key=body["key"]))[0] == 200
        client = aredis.Redis.from_url(redis_url)
        try:
            digest = (await client.hget(keys.customer_keys("acme"), body["id"])).decode()
            assert await client.delete(keys.api_key(digest)) == 1  # no PUBLISH
        finally:
            await client.aclose()
        await wait_until(lambda: _status(stack.call("echo", 1, key=body["key"])), 5.0,
                         "the cached key to be read again")


# ---- input limits ------------------------------------------------------------------------------

async def test_input_limits(redis_url: str, state_dir: Path) -> None:
    async with process_stack(redis_url, state_dir, ingress={"max_batch_items": 100, "max_json_depth": 16}) as stack:
        await stack.deploy("echo", stack.image, "models:echo")
        status, body, _ = await stack.call("echo", [[i, 0] for i in range(101)])
        assert (status, body["type"]) == (413, "too_many_items")
        assert (await stack.call("echo", [[i, 0] for i in range(100)]))[0] == 200
        deep: Any = 1
        for _ in range(20):
            deep = [deep]
        status, body, _ = await stack.call("echo", deep)
        assert (status, body["type"]) == (400, "bad_request") and "nests deeper" in body["error"]
        for path in ("/v1/m%C2%B2/latest", "/v1/echo/%C2%B2", "/v1/echo/1%C2%B2", "/v1/" + "m" * 300 + "/1"):
            status, body, _ = await stack.request("POST", path, {"data": 1},
                                                  {"Authorization": stack.key, "Host": "acme.localhost"})
            assert status in (400, 404) and set(body) == {"error", "type"}, (path, body)


async def test_one_customer_in_flight_past_its_limit_gets_429(redis_url: str, state_dir: Path) -> None:
    async with process_stack(redis_url, state_dir, ingress={"max_inflight_per_customer": 1},
                             replica_concurrency=2) as stack:
        await stack.deploy("slow", stack.image, "models:slow")
        globex_key = await stack.create_customer("globex")
        await stack.deploy("slow", stack.image, "models:slow", customer="globex")
        assert (await stack.call("slow", 0))[0] == 200  # warm
        first = asyncio.ensure_future(stack.call("slow", 3))
        await wait_until(lambda: _limiter(stack).in_flight("acme") == 1, 10, "acme's first call in flight")
        status, body, headers = await stack.call("slow", 0)
        assert (status, body["type"], headers["Retry-After"]) == (429, "rate_limited", "1")
        assert (await stack.call("slow", 0, key=globex_key, customer="globex"))[0] == 200
        assert (await first)[0] == 200


def _limiter(stack: Stack) -> Any:
    from ingress import state

    return stack.app[state.LIMITER]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("env", {"NVIDIA_VISIBLE_DEVICES": "all"}),
        ("env", {"CUDA_VISIBLE_DEVICES": "0"}),
        ("env", {"LUKEWARM_SOCKET": "/tmp/x"}),
        ("env", {f"V{i}": "x" for i in range(65)}),
        ("env", {"BIG": "x" * 40_000}),
        ("memory_mb", 1_048_576),
        ("cpus", 64),
        ("cpus", 0),
    ],
)
async def test_deploys_past_the_limits_are_refused(stack: Stack, field: str, value: Any) -> None:
    status, body = await stack.admin("POST", VERSIONS.format(c="acme", m="big"),
                                     {"image": stack.image, "entrypoint": "models:echo", field: value})
    assert (status, body["type"]) == (400, "bad_request"), body


async def test_a_cpu_version_sees_no_gpu_whatever_its_env(stack: Stack) -> None:
    await stack.deploy("env", stack.image, "models:environment")
    assert (await stack.call("env", "NVIDIA_VISIBLE_DEVICES"))[1] == {"data": "void"}
    assert (await stack.call("env", "CUDA_VISIBLE_DEVICES"))[1] == {"data": ""}


# ---- resources on a shared host ------------------------------------------------------------------

async def test_keep_warm_cannot_hold_a_full_host(redis_url: str, state_dir: Path) -> None:
    """Customer acme keeps two versions warm on a host of two slots; globex still gets served."""
    async with process_stack(redis_url, state_dir, max_replicas=2, max_replicas_per_customer=2) as stack:
        for n in (1, 2):
            await stack.deploy(f"warm{n}", stack.image, "models:echo", keep_warm=True)
            assert (await stack.call(f"warm{n}", n))[0] == 200
        globex_key = await stack.create_customer("globex")
        await stack.deploy("echo", stack.image, "models:echo", customer="globex")
        status, body, _ = await stack.call("echo", "g", key=globex_key, customer="globex", timeout_s=60)
        assert status == 200 and body == {"data": {"echo": "g"}}, body


async def test_one_customer_is_held_to_its_quota_on_a_host(redis_url: str, state_dir: Path) -> None:
    async with process_stack(redis_url, state_dir, max_replicas=4, max_replicas_per_customer=1) as stack:
        for n in (1, 2):
            await stack.deploy(f"m{n}", stack.image, "models:echo", keep_warm=True)
            assert (await stack.call(f"m{n}", n))[0] == 200
        assert stack.session is not None
        replicas = (await stack.proxies[0].state(stack.session))["replicas"]
        assert [r["version"] for r in replicas] == ["acme/m2/main/1"]


# ---- the status page ---------------------------------------------------------------------------

async def test_status_page_escapes_what_heartbeats_say(stack: Stack, redis_url: str) -> None:
    client = aredis.Redis.from_url(redis_url)
    try:
        evil = "<script>alert(1)</script>"
        await client.set(keys.proxy_heartbeat("evil"), orjson.dumps(
            {"proxy_id": evil, "url": evil, "epoch": evil, "ts": time.time(), "replicas": []}), ex=30)
        await client.zadd(keys.PROXIES, {"evil": time.time()})
    finally:
        await client.aclose()
    status, page, _ = await stack.request("GET", "/status", headers={"Authorization": f"Bearer {stack_admin()}"})
    text = page.decode() if isinstance(page, bytes) else str(page)
    assert status == 200 and "<script>" not in text and "&lt;script&gt;" in text


# ---- containers on the docker runtime ------------------------------------------------------------

@pytest.mark.docker
async def test_containers_are_limited_and_their_socket_directory_is_private(
        redis_url: str, state_dir: Path, model_image: str) -> None:
    async with running_stack(redis_url, state_dir, "docker", log_max_mb=3, run_dir_kb=512) as stack:
        await stack.customer("acme")
        own = f"lukewarm-acme/models:{uuid.uuid4().hex[:6]}"
        subprocess.run(["docker", "tag", model_image, own], check=True, capture_output=True, timeout=30)
        try:
            status, body, _ = await stack.request("POST", VERSIONS.format(c="acme", m="echo"),
                                                  {"image": own, "entrypoint": "models:echo", "cpus": 0.5},
                                                  {"Authorization": stack.key})
            assert status == 201 and body["image_id"].startswith("sha256:"), body
            assert (await stack.call("echo", 1))[0] == 200
            [(proxy, _, sock)] = await stack.replica_sockets()
            ids = subprocess.run(["docker", "ps", "-q", "--no-trunc", "--filter", f"label=lukewarm.proxy={proxy.proxy_id}"],
                                 capture_output=True, text=True, timeout=30).stdout.split()
            info = orjson.loads(subprocess.run(["docker", "inspect", ids[0]], capture_output=True, timeout=30).stdout)[0]
            host = info["HostConfig"]
            assert host["NanoCpus"] == 500_000_000
            assert host["LogConfig"] == {"Type": "json-file", "Config": {"max-size": "3m", "max-file": "2"}}
            assert {"Name": "nofile", "Soft": 4096, "Hard": 4096} in host["Ulimits"]
            assert host["NetworkMode"] == "none" and host["ReadonlyRootfs"] and host["CapDrop"] == ["ALL"]
            assert info["Image"] == body["image_id"]
            env = dict(e.split("=", 1) for e in info["Config"]["Env"])
            assert env["NVIDIA_VISIBLE_DEVICES"] == "void"
            run_dir = sock.parent
            assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
            assert stat.S_IMODE(sock.stat().st_mode) == 0o600
            assert stat.S_IMODE(run_dir.parent.stat().st_mode) == 0o700
            mounts = Path("/proc/self/mounts").read_text().splitlines()
            assert any(line.split()[1] == str(run_dir) and line.split()[2] == "tmpfs" and "size=512k" in line
                       for line in mounts), "the socket directory is its own bounded tmpfs"
        finally:
            subprocess.run(["docker", "rmi", own], capture_output=True, timeout=30)
