"""The command line against a real stack: log in once, then customers, keys, deploy with settings, versions,
aliases, rollback, logs, status and call, each answering a person (and refusals in one line)."""
from __future__ import annotations

import asyncio
import os
import stat
import sys
from pathlib import Path

import orjson
import pytest

from tests.faults.test_proxy_restart import MODELS
from tests.support.stack import ADMIN, REPO_ROOT, running_stack

pytestmark = [pytest.mark.timeout(180)]

COMMANDS = ["login", "customers create", "keys create", "keys list", "keys revoke", "deploy", "versions", "version",
            "alias",
            "rollback", "logs", "status", "call", "usage", "dev", "image build-base"]


async def lukewarm(config: Path, *args: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LUKEWARM_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "lukewarm", *args, cwd=REPO_ROOT, env={**env, "LUKEWARM_CONFIG": str(config)},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_a_person_logs_in_once_and_runs_the_fleet(redis_url: str, state_dir: Path, tmp_path: Path) -> None:
    config = tmp_path / "cfg" / "config.json"
    async with running_stack(redis_url, state_dir, "process") as stack:
        url = stack.url.replace("127.0.0.1", "localhost")
        code, _, err = await lukewarm(config, "login", "--url", url, "--token", "wrong", "--customer", "acme")
        assert code == 1 and err.count("\n") == 1 and "401" in err and not config.exists()
        assert (await lukewarm(config, "customers", "create", "acme", "--url", url, "--token", ADMIN))[0] == 0
        code, out, _ = await lukewarm(config, "login", "--url", url, "--token", ADMIN, "--customer", "acme")
        assert code == 0 and "logged in" in out
        assert stat.S_IMODE(config.stat().st_mode) == 0o600
        assert orjson.loads(config.read_bytes()) == {"url": url, "token": ADMIN, "customer": "acme"}

        # From here no --url, --token or --customer: the saved ones.
        code, out, _ = await lukewarm(config, "keys", "create", "--scope", "predict")
        assert code == 0
        made = orjson.loads(out)
        code, out, _ = await lukewarm(config, "keys", "list")
        assert code == 0 and made["id"] in out

        code, out, err = await lukewarm(config, "deploy", "echo", "--image", MODELS, "--entrypoint", "models:echo",
                                        "--memory-mb", "256", "--env", "GREETING=hi", "--max", "2",
                                        "--timeout-s", "30", "--at-most-once", "--wait")
        assert code == 0 and orjson.loads(out)["version"] == 1, err
        assert "deploying" in err and "version 1 deployed" in err
        code, out, _ = await lukewarm(config, "version", "echo", "1")
        shown = orjson.loads(out)
        assert (shown["memory_mb"], shown["env"], shown["capacity"]["max"], shown["timeout_s"], shown["at_most_once"]) \
            == (256, {"GREETING": "hi"}, 2, 30.0, True)
        assert (await lukewarm(config, "deploy", "echo", "--image", MODELS, "--entrypoint", "models:echo"))[0] == 0

        code, out, _ = await lukewarm(config, "call", "echo", "--data", '"x"', "--key", made["key"])
        assert code == 0 and orjson.loads(out) == {"data": {"echo": "x"}}
        assert (await lukewarm(config, "alias", "echo", "stable", "1"))[0] == 0
        code, out, _ = await lukewarm(config, "call", "echo", "stable", "--data", "1", "--key", made["key"])
        assert code == 0 and orjson.loads(out) == {"data": {"echo": 1}}
        code, out, _ = await lukewarm(config, "rollback", "echo")
        assert code == 0 and orjson.loads(out)["latest"] == 1
        code, out, _ = await lukewarm(config, "versions", "echo")
        assert code == 0 and [line.split() for line in out.splitlines()[1:]] == [["1", "latest,", "stable"], ["2"]]

        code, out, _ = await lukewarm(config, "logs", "echo", "--limit", "10")
        assert code == 0 and "stdout: echo 'x'" in out and "v2" in out
        code, out, _ = await lukewarm(config, "status")
        assert code == 0 and stack.proxies[0].proxy_id in out and "running" in out

        assert (await lukewarm(config, "keys", "revoke", made["id"]))[0] == 0
        code, _, err = await lukewarm(config, "call", "echo", "--data", "1", "--key", made["key"])
        assert code == 1
        code, _, err = await lukewarm(config, "version", "echo", "9")
        assert code == 1 and err.count("\n") == 1 and "404" in err and "Traceback" not in err


@pytest.mark.parametrize("command", COMMANDS)
async def test_every_command_explains_itself(command: str, tmp_path: Path) -> None:
    code, out, _ = await lukewarm(tmp_path / "none.json", *command.split(), "--help")
    assert code == 0 and out.startswith("usage: lukewarm ")
