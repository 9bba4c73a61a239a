"""Test tiers: unit tests need nothing; integration tests need a real redis-server;
docker tests a real Docker engine with the base image.

When ``CI`` is set, a missing Redis or Docker FAILS the test instead of
skipping it: a skip there would hide a missing install step.
"""
from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio as aredis

from tests.support import stack

pytest_plugins = ["tests.support.loops"]  # the run_on fixture: a scenario on asyncio's loop and on uvloop's

TEST_REDIS_URL = os.environ.get("LUKEWARM_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def missing(what: str) -> None:
    """Skip, or fail under CI, because ``what`` is not available."""
    if os.environ.get("CI"):
        pytest.fail(f"{what} (CI is set: install it instead of skipping; `make test` does)")
    pytest.skip(what)


@pytest.fixture(scope="session")
def redis_server() -> str:
    client = redis.Redis.from_url(TEST_REDIS_URL, socket_timeout=1, socket_connect_timeout=1)
    try:
        client.ping()
    except (redis.RedisError, OSError) as exc:
        missing(f"no redis-server answers at {TEST_REDIS_URL}: {exc}")
    finally:
        client.close()
    return TEST_REDIS_URL


@pytest.fixture
async def redis_url(redis_server: str) -> AsyncIterator[str]:
    """A clean Redis database for one test."""
    client = aredis.Redis.from_url(redis_server, socket_timeout=5, socket_connect_timeout=5)
    await client.flushdb()
    yield redis_server
    await client.flushdb()
    await client.aclose()


@pytest.fixture(scope="session")
def docker_engine() -> None:
    from runtime_proxy.docker_runtime import docker_available

    if not docker_available():
        missing("no Docker engine answers (start dockerd; `make test` does)")
    probe = subprocess.run(["docker", "image", "inspect", stack.BASE_IMAGE], capture_output=True, timeout=30)
    if probe.returncode != 0:
        missing(f"base image {stack.BASE_IMAGE} is missing (`lukewarm image build-base`; `make test` does)")


@pytest.fixture(scope="session")
def model_image(docker_engine: None, tmp_path_factory: pytest.TempPathFactory) -> str:
    """One image holding every test model (modules under tests/support/models)."""
    return stack.build_test_image(tmp_path_factory.mktemp("image"))


@pytest.fixture
def state_dir() -> Iterator[Path]:
    """A short state directory: Unix socket paths must stay under 108 bytes."""
    path = Path("/tmp") / f"lwt-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    yield path
    stack.unmount_below(path)  # replicas' socket tmpfs a stopped proxy keeps for re-adoption
    subprocess.run(["rm", "-rf", str(path)], check=False, timeout=30)


@pytest.fixture(scope="session")
def registry_binary(docker_engine: None) -> str:
    """Debian's ``docker-registry`` (tests/support/registry.py starts it): skipped without it, FAILS under CI."""
    from tests.support.registry import registry_binary as find

    found = find()
    if found is None:
        missing("docker-registry is not installed (apt-get install docker-registry; `make test` does)")
    return str(found)


@pytest.fixture(scope="session")
def redis_sentinel() -> None:
    """The binaries of a real Sentinel set (loadtests/redis_ha.py): redis-server and redis-sentinel."""
    import shutil

    for binary in ("redis-server", "redis-sentinel"):
        if shutil.which(binary) is None:
            missing(f"{binary} is not installed (Debian: apt-get install redis-server redis-sentinel)")
