"""Real models: a scikit-learn classifier (examples/sklearn-iris) built offline from requirements.txt,
trained at build time and served through the ingress; and a `lukewarm init` scaffold deployed as is."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.stack import ADMIN, REPO_ROOT, running_stack

pytestmark = [pytest.mark.timeout(900)]


async def cli(*args: str, url: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LUKEWARM_")}
    env.update(LUKEWARM_URL=url, LUKEWARM_TOKEN=ADMIN, LUKEWARM_CUSTOMER="acme",
               LUKEWARM_CONFIG=str(Path("/nonexistent/lukewarm.json")))
    if os.environ.get("LUKEWARM_WHEELHOUSE"):
        env["LUKEWARM_WHEELHOUSE"] = os.environ["LUKEWARM_WHEELHOUSE"]
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "lukewarm", *args, cwd=REPO_ROOT, env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 840)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def remove_images(repository: str) -> None:
    ids = subprocess.run(["docker", "images", "-q", repository], capture_output=True, text=True, timeout=60).stdout
    if ids.split():
        subprocess.run(["docker", "rmi", "-f", *set(ids.split())], capture_output=True, timeout=120)


async def test_a_scikit_learn_model_trained_at_build_time_answers(redis_url: str, state_dir: Path,
                                                                 docker_engine: None) -> None:
    async with running_stack(redis_url, state_dir, "docker") as stack:
        await stack.customer("acme")
        try:
            code, out, err = await cli("deploy", "iris", "--build", str(REPO_ROOT / "examples" / "sklearn-iris"),
                                       "--memory-mb", "1024", "--timeout-s", "120", "--wait", url=stack.url)
            assert code == 0, err[-3000:]
            assert "installing" in err and "building lukewarm-acme/iris:" in err and "version 1 deployed" in err
            status, body, _ = await stack.call("iris", [5.1, 3.5, 1.4, 0.2], timeout_s=180)
            assert status == 200 and body["data"]["species"] == "setosa", body
            status, body, _ = await stack.call("iris", [[1, [6.7, 3.0, 5.2, 2.3]], [2, [5.9, 2.8, 4.3, 1.3]]])
            assert status == 200 and [s["species"] for _, s in body["data"]] == ["virginica", "versicolor"], body
            # The same code builds the same tag: content-addressed, in the customer's namespace.
            code, _, err_again = await cli("deploy", "iris", "--build", str(REPO_ROOT / "examples" / "sklearn-iris"),
                                           url=stack.url)
            tag = [line for line in err.splitlines() if line.startswith("building ")][0].split()[1]
            assert code == 0 and f"building {tag}" in err_again
        finally:
            remove_images("lukewarm-acme/iris")


async def test_an_init_scaffold_deploys_as_it_is(redis_url: str, state_dir: Path, tmp_path: Path,
                                                 docker_engine: None) -> None:
    async with running_stack(redis_url, state_dir, "docker") as stack:
        await stack.customer("acme")
        code, out, _ = await cli("init", str(tmp_path / "hello"), url=stack.url)
        assert code == 0 and "main.py" in out
        try:
            code, _, err = await cli("deploy", "hello", "--build", str(tmp_path / "hello"), url=stack.url)
            assert code == 0, err
            assert (await stack.call("hello", "there"))[:2] == (200, {"data": {"echo": "there"}})
        finally:
            remove_images("lukewarm-acme/hello")
