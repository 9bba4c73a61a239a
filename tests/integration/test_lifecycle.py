"""Replica lifecycle on the real Docker engine: idle pause, unpause, keep-warm,
re-adoption after a proxy SIGKILL, timeouts, crashes, OOM, bad images and the
container hardening, each checked against what Docker itself reports.
"""
from __future__ import annotations

import asyncio
import subprocess
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest

from runtime_proxy import freezer
from tests.support.stack import BASE_IMAGE, Stack, running_stack, wait_until

pytestmark = [pytest.mark.timeout(240)]


def containers(proxy_id: str, **labels: str) -> list[dict[str, Any]]:
    """``docker inspect`` of the proxy's containers, optionally filtered by more labels."""
    filters = ["--filter", f"label=lukewarm.proxy={proxy_id}"]
    for k, v in labels.items():
        filters += ["--filter", f"label=lukewarm.{k}={v}"]
    ids = subprocess.run(["docker", "ps", "-aq", *filters], capture_output=True, text=True, timeout=30).stdout.split()
    if not ids:
        return []
    # A container removed between the two commands is missing from inspect's answer (exit 1, the rest kept).
    done = subprocess.run(["docker", "inspect", *ids], capture_output=True, timeout=30)
    if done.returncode and b"No such object" not in done.stderr:
        raise RuntimeError(f"docker inspect: {done.stderr.decode(errors='replace')}")
    return list(orjson.loads(done.stdout or b"[]"))


def status_of(proxy_id: str, model: str) -> list[str]:
    """Docker's status, except that a container whose cgroup the proxy froze (Docker calls it running)
    is ``paused``: read from the kernel's freezer, not from what the proxy says."""
    return [effective_status(c) for c in containers(proxy_id, model=model)]


def effective_status(container: dict[str, Any]) -> str:
    status = str(container["State"]["Status"])
    file = freezer.locate(container["Id"])
    if status == "running" and file is not None and freezer.is_frozen(file):
        return "paused"
    return status


@pytest.fixture
async def stack(redis_url: str, state_dir: Path, model_image: str):
    async with running_stack(redis_url, state_dir, "docker", reaper_interval_s=0.1) as s:
        await s.customer("acme")
        s.image = model_image
        yield s


async def test_idle_replica_pauses_and_a_request_unpauses_it(stack: Stack) -> None:
    pid = stack.proxies[0].proxy_id
    await stack.deploy("echo", stack.image, entrypoint="models:echo", idle_timeout_s=0.5)
    assert (await stack.call("echo", "a"))[0] == 200
    [first] = containers(pid, model="echo")
    await wait_until(lambda: status_of(pid, "echo") == ["paused"], 20, "the idle replica to be paused", 0.1)

    status, body, headers = await stack.call("echo", "b")
    assert status == 200 and body == {"data": {"echo": "b"}}
    assert 'start;desc="lukewarm"' in headers["Server-Timing"]
    [again] = containers(pid, model="echo")
    assert again["Id"] == first["Id"]
    assert effective_status(again) == "running"
    assert again["State"]["StartedAt"] == first["State"]["StartedAt"], "unpause must not restart"


async def test_a_paused_replica_is_readopted_paused_after_a_proxy_sigkill(stack: Stack) -> None:
    """The proxy froze the cgroup itself, so only the kernel knows it is paused: a restarted proxy
    must learn that from the freezer, keep it paused, and thaw it for the next call."""
    pid = stack.proxies[0].proxy_id
    await stack.deploy("echo", stack.image, entrypoint="models:echo", idle_timeout_s=0.5)
    assert (await stack.call("echo", "a"))[0] == 200
    [first] = containers(pid, model="echo")
    await wait_until(lambda: status_of(pid, "echo") == ["paused"], 20, "the idle replica to be paused", 0.1)

    stack.proxies[0].kill()
    await stack.proxies[0].start()
    assert status_of(pid, "echo") == ["paused"], "re-adoption must not thaw an idle replica"
    assert stack.session is not None
    replicas = (await stack.proxies[0].state(stack.session))["replicas"]
    [mine] = [r for r in replicas if r["version"].split("/")[1] == "echo"]
    assert mine["state"] == "paused"

    status, body, headers = await stack.call("echo", "b")
    assert status == 200 and body == {"data": {"echo": "b"}}
    assert 'start;desc="lukewarm"' in headers["Server-Timing"]
    [again] = containers(pid, model="echo")
    assert again["Id"] == first["Id"] and effective_status(again) == "running"
    assert again["State"]["StartedAt"] == first["State"]["StartedAt"], "a thaw must not restart"


async def test_a_retired_frozen_replica_is_removed(stack: Stack) -> None:
    """A retired replica that is frozen (dockerd thinks it running) is still removed for good."""
    pid = stack.proxies[0].proxy_id
    version = await stack.deploy("echo", stack.image, entrypoint="models:echo", idle_timeout_s=0.5)
    assert (await stack.call("echo", "a"))[0] == 200
    await wait_until(lambda: status_of(pid, "echo") == ["paused"], 20, "the idle replica to be paused", 0.1)
    status, body = await stack.admin("DELETE", f"/api/v1/customers/acme/models/echo/branches/main/versions/{version}")
    assert status in (200, 204), body
    await wait_until(lambda: status_of(pid, "echo") == [], 20, "the retired, frozen replica to be removed", 0.1)


async def test_keep_warm_is_never_paused(stack: Stack) -> None:
    pid = stack.proxies[0].proxy_id
    image = stack.image
    await stack.deploy("idle", image, entrypoint="models:echo", idle_timeout_s=0.5)
    await stack.deploy("warm", image, entrypoint="models:echo", idle_timeout_s=0.5, keep_warm=True)
    assert (await stack.call("warm", 1))[0] == 200
    assert (await stack.call("idle", 1))[0] == 200  # from here on "warm" has been idle at least as long
    await wait_until(lambda: status_of(pid, "idle") == ["paused"], 20, "the idle replica to be paused", 0.1)
    # The round that paused "idle" may still be going. Rounds run one after another, and a replica
    # started now is paused by a round that began after it existed: once "later" is paused, that
    # first round, which judged "warm" too, is over.
    await stack.deploy("later", image, entrypoint="models:echo", idle_timeout_s=0.5)
    assert (await stack.call("later", 1))[0] == 200
    await wait_until(lambda: status_of(pid, "later") == ["paused"], 20, "a replica started later to be paused", 0.1)
    assert status_of(pid, "warm") == ["running"]


async def test_sigkilled_proxy_readopts_its_containers(stack: Stack) -> None:
    proxy = stack.proxies[0]
    await stack.deploy("echo", stack.image, entrypoint="models:echo")
    assert (await stack.call("echo", "a"))[0] == 200
    [before] = containers(proxy.proxy_id, model="echo")

    proxy.kill()
    await proxy.start()
    status, body, headers = await stack.call("echo", "b")
    assert status == 200 and body == {"data": {"echo": "b"}}
    assert 'start;desc="warm"' in headers["Server-Timing"], "the adopted container serves warm"
    [after] = containers(proxy.proxy_id, model="echo")
    assert after["Id"] == before["Id"]
    assert after["State"]["StartedAt"] == before["State"]["StartedAt"], "re-adoption never restarts"


async def test_timeout_gives_504_and_the_stuck_replica_is_replaced(stack: Stack) -> None:
    pid = stack.proxies[0].proxy_id
    await stack.deploy("slow", stack.image, entrypoint="models:slow", timeout_s=1)
    assert (await stack.call("slow", 0))[0] == 200
    [stuck] = containers(pid, model="slow")
    status, body, _ = await stack.call("slow", 30, timeout_s=20)
    assert status == 504 and body["type"] == "timeout"
    status, body, _ = await stack.call("slow", 0)
    assert status == 200, body
    await wait_until(lambda: stuck["Id"] not in [c["Id"] for c in containers(pid, model="slow")], 20,
                     "the stuck container to be removed", 0.1)


async def test_container_killed_mid_request_fails_at_once_then_recovers(stack: Stack) -> None:
    pid = stack.proxies[0].proxy_id
    await stack.deploy("slow", stack.image, entrypoint="models:slow")
    assert (await stack.call("slow", 0))[0] == 200
    [victim] = containers(pid, model="slow")
    call = asyncio.create_task(stack.call("slow", 60))
    await wait_until(lambda: any(r["in_flight"] for r in _replicas(stack)), 10, "the call to be in flight")
    subprocess.run(["docker", "kill", victim["Id"]], check=True, capture_output=True, timeout=30)
    status, body, _ = await asyncio.wait_for(call, 15)  # the model would sleep 60 s: this is "at once"
    assert status == 502 and body["type"] == "model_crashed", body
    status, body, _ = await stack.call("slow", 0)
    assert status == 200, body


@pytest.mark.parametrize("frozen", [False, True], ids=["running", "paused"])
async def test_a_container_that_dies_while_idle_is_retired_and_the_next_call_served(stack: Stack, frozen: bool) -> None:
    """The reaper notices an idle replica's container is gone (one cheap question to the engine per round,
    not an inspect per replica) and forgets it; the next call starts a fresh one."""
    pid = stack.proxies[0].proxy_id
    await stack.deploy("echo", stack.image, entrypoint="models:echo", idle_timeout_s=0.5 if frozen else 600)
    assert (await stack.call("echo", "a"))[0] == 200
    if frozen:
        await wait_until(lambda: status_of(pid, "echo") == ["paused"], 20, "the idle replica to be paused", 0.1)
    [victim] = containers(pid, model="echo")
    subprocess.run(["docker", "kill", victim["Id"]], check=True, capture_output=True, timeout=30)
    await wait_until(lambda: not any(r["version"].split("/")[1] == "echo" for r in _replicas(stack)), 20,
                     "the dead replica to be forgotten", 0.1)
    status, body, headers = await stack.call("echo", "b")
    assert status == 200 and body == {"data": {"echo": "b"}}
    assert 'start;desc="cold"' in headers["Server-Timing"]


def _replicas(stack: Stack) -> list[dict[str, Any]]:
    from ingress import state

    return [
        {"version": r.version, "in_flight": r.in_flight, "state": r.state}
        for p in stack.app[state.VIEW].live_proxies() for r in p.replicas
    ]


async def test_model_that_kills_itself_is_reported_crashed(stack: Stack) -> None:
    await stack.deploy("crash", stack.image, entrypoint="models:crash")
    status, body, _ = await stack.call("crash", "die")
    assert status == 502 and body["type"] == "model_crashed"
    assert (await stack.call("crash", "ok"))[0] == 200


async def test_memory_limit_exceeded_is_oom(stack: Stack) -> None:
    await stack.deploy("hog", stack.image, entrypoint="models:hog", memory_mb=64)
    status, body, _ = await stack.call("hog", 40)  # 640 MiB into a 64 MiB limit
    assert status == 502 and body["type"] == "oom", body
    status, body, _ = await stack.call("hog", 1)
    assert status == 200 and body == {"data": 1}


async def test_an_image_missing_at_deploy_is_refused_and_uses_no_number(stack: Stack) -> None:
    path = "/api/v1/customers/acme/models/ghost/branches/main/versions"
    status, body = await stack.admin("POST", path, {"image": "lukewarm-test/does-not-exist:1"})
    assert (status, body["type"]) == (422, "image_unavailable"), body
    assert "does-not-exist" in body["error"]
    assert await stack.deploy("ghost", stack.image, entrypoint="models:echo") == 1


def _build(tag: str, source: str, workdir: Path) -> None:
    from runtime_proxy.docker_runtime import build_image

    (workdir / "Dockerfile").write_text(f"FROM {BASE_IMAGE}\nWORKDIR /app\nCOPY models.py /app/\n")
    (workdir / "models.py").write_text(source)
    build_image(str(workdir), tag)


async def test_a_version_runs_the_content_it_was_deployed_with_forever(stack: Stack, tmp_path: Path) -> None:
    """The tag is resolved to the image's id at deploy: a rebuild under the same tag changes no old version;
    when the pinned content is gone for good the call fails clearly, and is not retried in a loop."""
    tag = f"lukewarm-test/pinned:{uuid.uuid4().hex[:8]}"
    for n, answer in enumerate(("first", "second")):
        (tmp_path / answer).mkdir()
        await asyncio.to_thread(_build, tag, f"def which(x):\n    return {answer!r}\n", tmp_path / answer)
        assert await stack.deploy("pinned", tag, entrypoint="models:which") == n + 1
    try:
        assert (await stack.call("pinned", 0, version="1"))[1] == {"data": "first"}
        assert (await stack.call("pinned", 0, version="2"))[1] == {"data": "second"}
        first_id = (await stack.admin("GET", "/api/v1/customers/acme/models/pinned/branches/main/versions/1"))[1]
        assert first_id["image_id"].startswith("sha256:")
        subprocess.run(["docker", "rm", "-f", *[c["Id"] for c in containers(stack.proxies[0].proxy_id,
                                                                          model="pinned")]],
                       capture_output=True, timeout=60)
        subprocess.run(["docker", "rmi", "-f", first_id["image_id"]], capture_output=True, timeout=60)

        async def forgotten() -> bool:  # the reaper notices the removed containers
            replicas = (await stack.proxies[0].state(stack.session))["replicas"]  # type: ignore[arg-type]
            return not any(r["version"].startswith("acme/pinned/") for r in replicas)

        await wait_until(forgotten, 20, "the proxy to forget the removed replicas")
        status, body, _ = await stack.call("pinned", 0, version="1", timeout_s=60)
        assert (status, body["type"]) == (502, "image_unavailable"), body
        assert "/var/lib" not in body["error"] and "docker" not in body["error"].lower()
        status, again, headers = await stack.call("pinned", 0, version="1", timeout_s=10)
        assert status == 502 and "not retried" in again["error"]
        assert int(headers["Retry-After"]) >= 1
        assert (await stack.call("pinned", 0, version="2"))[1] == {"data": "second"}
    finally:
        subprocess.run(["docker", "rmi", "-f", tag], capture_output=True, timeout=60)


async def test_bad_entrypoint_fails_with_the_harness_error(stack: Stack) -> None:
    pid = stack.proxies[0].proxy_id
    await stack.deploy("broken", stack.image, entrypoint="broken:predict")
    status, body, _ = await stack.call("broken", 1, timeout_s=60)
    assert status == 502 and body["type"] == "model_load_failed", body
    assert body["error"] == "ModuleNotFoundError: No module named 'nope_this_module_does_not_exist'"
    await wait_until(lambda: containers(pid, model="broken") == [], 20, "the failed container to be removed", 0.1)
    status, body, _ = await stack.call("broken", 1, timeout_s=10)
    assert status == 502 and "not retried" in body["error"]
    assert containers(pid, model="broken") == [], "backoff: no new container in a tight loop"


async def test_containers_run_hardened(stack: Stack) -> None:
    pid = stack.proxies[0].proxy_id
    await stack.deploy("who", stack.image, entrypoint="models:whoami", memory_mb=128)
    status, body, _ = await stack.call("who", None)
    assert status == 200 and body["data"]["uid"] == 65534
    [c] = containers(pid, model="who")
    host = c["HostConfig"]
    assert host["NetworkMode"] == "none"
    assert host["CapDrop"] == ["ALL"]
    assert host["ReadonlyRootfs"] is True
    assert "no-new-privileges" in host["SecurityOpt"]
    assert host["PidsLimit"] > 0
    assert host["Memory"] == 128 * 1024 * 1024
    assert host["Init"] is True
    assert c["Config"]["User"] == "65534:65534"
    # The heartbeat reports what the container uses, read from its cgroup.
    seen: list[dict[str, Any]] = []

    async def reported() -> bool:
        proxies = (await stack.admin("GET", "/api/v1/status"))[1]["proxies"]
        seen[:] = [r for p in proxies if p["proxy_id"] == pid for r in p["replicas"]
                   if r["version"] == "acme/who/main/1" and "memory_used_mb" in r]
        return bool(seen)

    await wait_until(reported, 10, "the replica's usage in a heartbeat", 0.05)
    assert 0 < seen[0]["memory_used_mb"] <= 128 and seen[0]["cpu_s"] > 0
    labels = c["Config"]["Labels"]
    assert {labels[f"lukewarm.{k}"] for k in ("customer", "model", "branch", "version", "proxy")} == {
        "acme", "who", "main", "1", pid}


async def test_long_idle_replica_is_stopped_then_restarted_lukewarm_after_a_proxy_restart(
    redis_url: str, state_dir: Path, model_image: str,
) -> None:
    async with running_stack(redis_url, state_dir, "docker", reaper_interval_s=0.1, pause_stop_after_s=0.3) as s:
        await s.customer("acme")
        pid = s.proxies[0].proxy_id
        await s.deploy("echo", model_image, entrypoint="models:echo", idle_timeout_s=0.3)
        assert (await s.call("echo", "a"))[0] == 200
        [first] = containers(pid, model="echo")
        await wait_until(lambda: status_of(pid, "echo") == ["exited"], 20, "paused, then stopped", 0.1)
        [stopped] = containers(pid, model="echo")
        # Thawed before the stop: the harness took SIGTERM and left cleanly. Still frozen, it could not
        # have, and dockerd would have SIGKILLed it (137) once the stop timeout ran out.
        assert stopped["State"]["ExitCode"] == 0, stopped["State"]

        s.proxies[0].kill()
        await s.proxies[0].start()  # re-adopts the stopped container as a stopped replica
        status, body, headers = await s.call("echo", "b")
        assert status == 200 and body == {"data": {"echo": "b"}}
        assert 'start;desc="lukewarm"' in headers["Server-Timing"]
        [again] = containers(pid, model="echo")
        assert again["Id"] == first["Id"], "the stopped container itself was started again"
        assert again["State"]["Status"] == "running"
