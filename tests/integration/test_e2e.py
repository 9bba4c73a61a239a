"""End to end: deploy → call single and batch → every error of DESIGN.md this path covers.

Runs on the real Docker engine with a real container built from the base
image, and again on the process runtime (the embedded default).
"""
from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.support.stack import ADMIN, MODELS_DIR, REPO_ROOT, Stack, running_stack, wait_until

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(params=["docker", "process"])
async def stack(request: pytest.FixtureRequest, redis_url: str, state_dir: Path):
    if request.param == "docker":
        image = request.getfixturevalue("model_image")
    else:
        image = f"dir:{MODELS_DIR}"
    async with running_stack(redis_url, state_dir, request.param) as s:
        await s.customer("acme")
        s.image = image
        yield s


async def test_single_and_batch_calls(stack: Stack) -> None:
    version = await stack.deploy("echo", stack.image, entrypoint="models:echo")
    status, body, headers = await stack.call("echo", "world")
    assert status == 200, body
    assert body == {"data": {"echo": "world"}}
    assert headers["X-Model-Version"] == str(version)
    assert headers["X-Request-Id"]
    assert 'start;desc="cold"' in headers["Server-Timing"]

    items = [[i, f"item-{i}"] for i in range(100)]
    status, body, headers = await stack.call("echo", items, version=str(version))
    assert status == 200, body
    assert body["data"] == [[i, {"echo": f"item-{i}"}] for i in range(100)]
    assert 'start;desc="warm"' in headers["Server-Timing"]


async def test_batch_size_version_gets_lists(stack: Stack) -> None:
    await stack.deploy("double", stack.image, entrypoint="models:double_batch", batch_size=7)
    status, body, _ = await stack.call("double", [[f"id{i}", i] for i in range(30)])
    assert status == 200, body
    assert body["data"] == [[f"id{i}", 2 * i] for i in range(30)]


async def test_model_stdout_reaches_logs_and_traceback_stays_out(stack: Stack) -> None:
    await stack.deploy("echo", stack.image, entrypoint="models:echo")
    status, body, _ = await stack.call("echo", "raise")
    assert status == 422
    assert body == {"error": "ValueError: bad input", "type": "model_error"}
    assert "Traceback" not in str(body)
    status, logs = await stack.admin("GET", "/api/v1/customers/acme/models/echo/branches/main/logs?limit=5")
    assert status == 200
    newest = logs["logs"][0]
    assert newest["error"] == "ValueError: bad input"
    assert "Traceback" in newest["traceback"]
    assert "echo 'raise'" in newest["stdout"]
    assert "to stderr" in newest["stderr"]


async def test_errors(stack: Stack) -> None:
    await stack.deploy("echo", stack.image, entrypoint="models:echo")
    other_key = await stack.customer("globex")
    host = {"Host": "acme.localhost", "Authorization": stack.key}

    # 400: malformed JSON, wrong shape, unknown field, bad timeout.
    for raw in (b"{not json", b"[1, 2]", b'{"nodata": 1}', b'{"data": 1, "timeout_seconds": -1}'):
        status, body, _ = await stack.request("POST", "/v1/echo/latest", raw=raw, headers=host)
        assert status == 400, raw
        assert body["type"] == "bad_request" and body["error"]
    # 401: no key, unknown key.
    assert (await stack.call("echo", 1, key=""))[0] == 401
    status, body, _ = await stack.call("echo", 1, key="lw_not_a_key")
    assert status == 401 and body["type"] == "unauthorized"
    # 403: a key of another customer.
    status, body, _ = await stack.call("echo", 1, key=other_key)
    assert status == 403 and body["type"] == "forbidden"
    # 404: unknown model, version, alias, branch.
    for path in ("/v1/nope/latest", "/v1/echo/99", "/v1/echo/some_alias", "/v1/echo/dev/latest"):
        status, body, _ = await stack.request("POST", path, {"data": 1}, host)
        assert status == 404, path
        assert body["type"] == "not_found"
    # 413: a body over the limit, refused without reading it whole.
    big = b'{"data": "' + b"x" * (33 * 1024 * 1024) + b'"}'
    status, body, _ = await stack.request("POST", "/v1/echo/latest", raw=big, headers=host)
    assert status == 413 and body["type"] == "too_large"
    # Nothing was lost: the model still answers after all of that.
    status, body, _ = await stack.call("echo", "still here")
    assert status == 200 and body == {"data": {"echo": "still here"}}


async def test_deploy_validation_uses_no_version_number(stack: Stack) -> None:
    base = "/api/v1/customers/acme/models/echo/branches/main/versions"
    for bad in ({}, {"image": ""}, {"image": "x", "entrypoint": "no colon"}, {"image": "x", "batch_size": 0},
                {"image": "x", "surprise": 1}, {"image": "x", "env": {"LUKEWARM_SOCKET": "/x"}}):
        status, body = await stack.admin("POST", base, bad)
        assert status == 400, bad
        assert body["type"] == "bad_request"
    assert await stack.deploy("echo", stack.image, entrypoint="models:echo") == 1


async def test_cli_deploy_and_call(stack: Stack) -> None:
    """`lukewarm deploy` and `lukewarm call`, as a person types them, against the running stack."""
    async def cli(*args: str) -> tuple[int, Any]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "lukewarm.cli", *args, "--url", stack.url, "--customer", "acme",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=REPO_ROOT)
        out, err = await asyncio.wait_for(proc.communicate(), 120)
        return proc.returncode or 0, orjson.loads(out) if out.strip() else err.decode()

    code, body = await cli("deploy", "echo", "--image", stack.image, "--entrypoint", "models:echo", "--token", ADMIN)
    assert code == 0 and body["version"] == 1, body
    code, body = await cli("call", "echo", "--data", '"from the cli"', "--key", stack.key)
    assert code == 0 and body == {"data": {"echo": "from the cli"}}, body
    code, body = await cli("call", "echo", "7", "--data", "1", "--key", stack.key)
    assert code == 1 and body["type"] == "not_found", body


async def test_capacity_min_prewarms_before_latest_moves(stack: Stack) -> None:
    from ingress import state

    base = "/api/v1/customers/acme/models/echo/branches/main/versions"
    assert await stack.deploy("echo", stack.image, entrypoint="models:echo") == 1
    # A version that never gets ready is refused, uses no number, and latest stays.
    status, body = await stack.admin("POST", base, {"image": stack.image, "entrypoint": "broken:predict",
                                                    "capacity": {"min": 1}})
    assert status == 422 and body["type"] == "prewarm_failed", body
    assert "No module named 'nope_this_module_does_not_exist'" in body["error"]
    assert (await stack.call("echo", "x"))[2]["X-Model-Version"] == "1"
    assert (await stack.admin("GET", base + "/2"))[0] == 404
    # A good one is warm before the answer: a replica runs before any call.
    status, body = await stack.admin("POST", base, {"image": stack.image, "entrypoint": "models:echo",
                                                    "capacity": {"min": 1}})
    assert status == 201 and body["version"] == 2, body
    view = stack.app[state.VIEW]
    await wait_until(lambda: any(r.version == "acme/echo/main/2" and r.state == "running"
                                 for p in view.live_proxies() for r in p.replicas),
                     5, "the pre-warmed replica in a heartbeat")
    status, body, headers = await stack.call("echo", "y")
    assert status == 200 and headers["X-Model-Version"] == "2"
    assert 'start;desc="warm"' in headers["Server-Timing"]
