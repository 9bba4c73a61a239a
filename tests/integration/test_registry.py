"""Images through a registry, on a real registry (Debian's docker-registry) and the real Docker engine:
``lukewarm deploy --build`` pushes and deploys the pushed digest; a host without the image pulls it by
that digest (with the login from LUKEWARM_REGISTRY_AUTH_FILE when the registry wants one); a later
push under the same tag changes no old version; pruning removes only images it could pull back.

One engine serves every "host" here, so a host that never had the image is made by removing it.
"""
from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from runtime_proxy.docker_runtime import DockerRuntime, build_image, push_image
from runtime_proxy.images import ImageBook
from tests.support.registry import Login, Registry, bcrypt_hash, running_registry
from tests.support.stack import ADMIN, BASE_IMAGE, REPO_ROOT, Stack, running_stack

pytestmark = pytest.mark.timeout(300)

DIGEST_REF = r"sha256:[0-9a-f]{64}"


def _docker(*args: str, timeout_s: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout_s)


def _has_image(reference: str) -> bool:
    return _docker("image", "inspect", reference).returncode == 0


def _remove_local(registry: Registry) -> None:
    """Every image of ``registry`` this engine holds, by id (tags and digests at once): a host without them."""
    listing = _docker("image", "ls", "--no-trunc", "--format", "{{.ID}} {{.Repository}}").stdout.split("\n")
    ids = {line.split()[0] for line in listing if line.split()[1:] and line.split()[1].startswith(registry.host + "/")}
    if ids:
        _docker("rmi", "-f", *sorted(ids))


@pytest.fixture(scope="module")
def registry(registry_binary: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """One registry with no login for the module (the base image's layer is pushed once)."""
    root = tmp_path_factory.mktemp("registry")
    with running_registry(root) as r:
        try:
            yield r
        finally:
            _remove_local(r)
    shutil.rmtree(root / "data", ignore_errors=True)  # pushed blobs: the base image's layer, ~50 MB


@pytest.fixture(scope="module")
def login_registry(registry_binary: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A registry behind an htpasswd login; where no bcrypt hash can be made here, behind the registry's
    "silly" auth instead (any credentials pass: only having a login or not is tried then)."""
    root = tmp_path_factory.mktemp("login-registry")
    scheme = "htpasswd" if bcrypt_hash("probe") is not None else "silly"
    with running_registry(root, Login("lukewarm", uuid.uuid4().hex, scheme)) as r:
        try:
            yield r
        finally:
            _remove_local(r)
    shutil.rmtree(root / "data", ignore_errors=True)


@pytest.fixture(autouse=True)
def _clean(request: pytest.FixtureRequest) -> Iterator[None]:
    """Each test starts and ends with none of the registries' images on this engine."""
    registries = [request.getfixturevalue(name) for name in ("registry", "login_registry")
                  if name in request.fixturenames]
    for r in registries:
        _remove_local(r)
    yield
    for r in registries:
        _remove_local(r)


def _model_dir(root: Path, answer: str) -> Path:
    """A build context whose model ``model:which`` answers ``answer``."""
    ctx = root / f"ctx-{answer}"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(f"FROM {BASE_IMAGE}\nWORKDIR /app\nCOPY model.py /app/\n")
    (ctx / "model.py").write_text(f"def which(x):\n    return {answer!r}\n")
    return ctx


async def _cli(*args: str, env: dict[str, str] | None = None, timeout_s: float = 240.0) -> tuple[int, str, str]:
    """``lukewarm …`` as a user runs it (a subprocess: the ingress in this loop keeps serving)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("LUKEWARM_REGISTRY")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "lukewarm.cli", *args, cwd=REPO_ROOT, env={**base, **(env or {})},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def _deploy(stack: Stack, model: str, ctx: Path, *flags: str, env: dict[str, str] | None = None,
                  token: str = ADMIN) -> dict:
    code, out, err = await _cli("deploy", model, "--build", str(ctx), "--entrypoint", "model:which",
                                "--customer", "acme", "--url", stack.url, "--token", token, *flags, env=env)
    assert code == 0, (out, err)
    return dict(orjson.loads(out))


async def test_deploy_build_pushes_and_deploys_the_digest_a_host_without_it_pulls(
        registry: Registry, redis_url: str, state_dir: Path, tmp_path: Path) -> None:
    async with running_stack(redis_url, state_dir, "docker") as stack:
        key = await stack.customer("acme")
        # The customer's own deploy key: the pushed reference is in its namespace (DESIGN.md, Trust).
        body = await _deploy(stack, "reg", _model_dir(tmp_path, "one"), env={"LUKEWARM_REGISTRY": registry.host},
                             token=key)
        pushed = body["image"]
        assert re.fullmatch(rf"{re.escape(registry.host)}/lukewarm-acme/reg@{DIGEST_REF}", pushed), body
        assert body["image_id"] == pushed  # pinned to what any host can pull, not to this engine's content id
        repository, digest = pushed.split("@")
        assert registry.has_manifest(repository.split("/", 1)[1], digest)

        _remove_local(registry)
        assert not _has_image(pushed)
        status, answer, headers = await stack.call("reg", 0)
        assert (status, answer) == (200, {"data": "one"}), answer
        assert 'start;desc="cold"' in headers["Server-Timing"]
        assert _has_image(pushed)  # pulled by its digest


async def test_a_push_under_the_same_tag_changes_no_old_version(
        registry: Registry, redis_url: str, state_dir: Path, tmp_path: Path) -> None:
    async with running_stack(redis_url, state_dir, "docker") as stack:
        await stack.customer("acme")
        same_tag = ["--registry", registry.host, "--image", "lukewarm-acme/pinned:stable"]
        first = await _deploy(stack, "pinned", _model_dir(tmp_path, "first"), *same_tag)
        second = await _deploy(stack, "pinned", _model_dir(tmp_path, "second"), *same_tag)
        assert (first["version"], second["version"]) == (1, 2)
        assert first["image"] != second["image"]
        assert first["image"].startswith(f"{registry.host}/lukewarm-acme/pinned@sha256:")
        # The tag names the second build now; the first version still names the first.
        assert registry.has_manifest("lukewarm-acme/pinned", second["image"].split("@")[1])

        _remove_local(registry)  # every host forgets both: the first can come back only by its digest
        assert (await stack.call("pinned", 0, version="1"))[:2] == (200, {"data": "first"})
        assert (await stack.call("pinned", 0, version="2"))[:2] == (200, {"data": "second"})
        assert (await stack.call("pinned", 0))[:2] == (200, {"data": "second"})


async def test_pulls_log_in_with_the_auth_file_and_without_one_fail_clearly(
        login_registry: Registry, redis_url: str, state_dir: Path, tmp_path: Path) -> None:
    auth_file = login_registry.auth_file(tmp_path / "config.json")
    (state_dir / "a").mkdir()
    (state_dir / "b").mkdir()
    async with running_stack(redis_url, state_dir / "a", "docker") as stack:
        await stack.customer("acme")
        body = await _deploy(stack, "private", _model_dir(tmp_path, "private"), "--registry", login_registry.host,
                             env={"LUKEWARM_REGISTRY_AUTH_FILE": str(auth_file)})
        pushed = body["image"]
        _remove_local(login_registry)

        # This proxy has no login: the call fails at once with a clear error, not a hang.
        started = time.monotonic()
        status, answer, _ = await stack.call("private", 0, timeout_s=60)
        assert (status, answer["type"]) == (502, "image_unavailable"), answer
        assert answer["error"] == f"the model's image {pushed} is not available on this host"
        assert time.monotonic() - started < 30
        assert not _has_image(pushed)
        log = stack.proxies[0].log()
        assert "cannot pull image" in log and pushed in log
        if login_registry.login is not None and login_registry.login.scheme == "htpasswd":
            assert re.search(r"unauthorized|authentication required|no basic auth", log, re.IGNORECASE), log[-2000:]

    # Another proxy, given the login file: it pulls by digest and answers.
    async with running_stack(redis_url, state_dir / "b", "docker", registry_auth_file=str(auth_file)) as stack:
        await stack.customer("acme")
        assert (await stack.call("private", 0))[:2] == (200, {"data": "private"})
        assert _has_image(pushed)


async def test_a_failed_push_is_one_line_on_stderr(login_registry: Registry, tmp_path: Path) -> None:
    ctx = _model_dir(tmp_path, "nopush")
    common = ("deploy", "nopush", "--build", str(ctx), "--customer", "acme", "--url", "http://127.0.0.1:9")
    # No login for a registry that wants one.
    code, out, err = await _cli(*common, "--registry", login_registry.host)
    assert code != 0 and out == ""
    # What it was doing (progress lines), then the failure, in one line.
    assert err.startswith("building ") and "Traceback" not in err, err
    assert err.splitlines()[-1].startswith(f"lukewarm deploy: cannot push {login_registry.host}/lukewarm-acme/nopush:")
    # A malformed login file is named, in one line.
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    code, out, err = await _cli(*common, "--registry", login_registry.host, "--registry-auth-file", str(bad))
    assert code != 0 and f"registry login file {bad}: not JSON" in err.splitlines()[-1] and "Traceback" not in err, err
    # A registry host that is not one.
    code, _, err = await _cli(*common, "--registry", "https://example.com")
    assert code != 0 and "must be a registry host" in err and "Traceback" not in err


async def test_pruning_keeps_a_local_only_image_and_removes_a_pullable_one(
        registry: Registry, tmp_path: Path) -> None:
    local = f"lukewarm-acme/local-only:{uuid.uuid4().hex[:8]}"
    repository = f"{registry.host}/lukewarm-acme/prunable"
    runtime = DockerRuntime()
    try:
        await asyncio.to_thread(build_image, str(_model_dir(tmp_path, "local")), local)
        image_id = await asyncio.to_thread(build_image, str(_model_dir(tmp_path, "pushed")), f"{repository}:1")
        pushed = await asyncio.to_thread(push_image, image_id, repository, "1")
        _remove_local(registry)
        await runtime.pull(pushed)  # as a proxy host has it: by its digest only
        assert await runtime.resolve_image(pushed) == pushed
        assert await runtime.resolve_image(local) == (await asyncio.to_thread(_docker, "image", "inspect", "--format",
                                                                             "{{.Id}}", local)).stdout.strip()
        assert (await runtime.pullable(pushed), await runtime.pullable(local)) == (True, False)

        book = ImageBook(idle_s=60.0, max_images=50)
        book.note(local, 0.0)
        book.note(pushed, 0.0)
        assert await book.prune(runtime, [], now=1000.0) == [pushed]
        assert _has_image(local) and not _has_image(pushed)
        assert list(book.last_used) == [local]
        assert await book.prune(runtime, [], now=2000.0) == []
        assert _has_image(local)

        await runtime.pull(pushed)  # what was pruned can come back
        assert _has_image(pushed)
    finally:
        await runtime.close()
        _docker("rmi", "-f", local)
