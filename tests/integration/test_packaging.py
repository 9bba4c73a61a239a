"""Packaging: the ingress image (Dockerfile, .dockerignore, scripts/wheelhouse.sh) and the systemd units with
their example settings (deploy/).

- `docker build` succeeds with no network in the build, FROM the local base image, and the image answers
  `/healthz` (and `/readyz`, so Redis is reached), reports itself healthy by its own HEALTHCHECK, runs as
  a non-root user on a read-only root with no capabilities, stops cleanly on SIGTERM, and holds the
  ingress and nothing of the proxy, the load tests or the tests.
- `systemd-analyze verify` passes on both units (with the credentials drop-in deploy/README.md shows), and
  the units say what the deployment relies on (hardening, drain, devices, state directory).
- deploy/lukewarm.env.example names every setting and nothing else, with values of the right type.

Without Docker or systemd-analyze these skip; under CI they fail (tests/conftest.py `missing`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar, get_type_hints

import pytest
import redis

from shared.sentinel_url import is_sentinel_url, parse_sentinel_url
from shared.settings import IngressSettings, ProxySettings, check_redis_url
from tests.conftest import missing
from tests.support.stack import free_port

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
IMAGE = "lukewarm-test/ingress:latest"
DEPS_IMAGE = "lukewarm-test/ingress-deps:latest"
UNITS = ("lukewarm-ingress.service", "lukewarm-proxy.service")
ENV_EXAMPLE = DEPLOY / "lukewarm.env.example"
# A wheelhouse download (first run) plus two builds.
BUILD_TIMEOUT_S = 900

T = TypeVar("T")


def wait_for(probe: Callable[[], T | None], timeout_s: float, what: str, interval_s: float = 0.2) -> T:
    """Poll ``probe`` until it returns something other than None; fail naming ``what`` past ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last: BaseException | None = None
    while True:
        try:
            value = probe()
            if value is not None:
                return value
        except Exception as exc:  # noqa: BLE001 - the last error is part of the failure message
            last = exc
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout_s:.0f} s (last error: {last!r})")
        time.sleep(interval_s)


def docker(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], check=False, capture_output=True, text=True, timeout=timeout)


def http_status(url: str) -> int:
    try:
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url, timeout=2) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        return exc.code


# --------------------------------------------------------------------------------------------------
# The image
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wheelhouse(docker_engine: None) -> Path:
    """build/wheelhouse/, filled by scripts/wheelhouse.sh (reused as it is when its inputs did not change)."""
    started = time.monotonic()
    run = subprocess.run([str(REPO / "scripts" / "wheelhouse.sh")], check=False, capture_output=True, text=True,
                         timeout=BUILD_TIMEOUT_S)
    if run.returncode == 75:
        missing(f"scripts/wheelhouse.sh cannot reach a package index: {run.stderr.strip()[-600:]}")
    assert run.returncode == 0, f"scripts/wheelhouse.sh failed:\n{run.stdout}\n{run.stderr[-3000:]}"
    print(f"wheelhouse: {time.monotonic() - started:.1f} s: {run.stdout.strip().splitlines()[-1]}")
    out = REPO / "build" / "wheelhouse"
    assert list(out.glob("*.whl")), "the wheelhouse holds no wheels"
    return out


@pytest.fixture(scope="module")
def image(wheelhouse: Path) -> Iterator[str]:
    """The ingress image, built with no network for its RUN steps; removed afterwards with its stages."""
    try:
        started = time.monotonic()
        # The dependencies stage under a tag of its own, so that it can be removed afterwards.
        deps = docker("build", "--network", "none", "--target", "deps", "-t", DEPS_IMAGE, str(REPO),
                      timeout=BUILD_TIMEOUT_S)
        assert deps.returncode == 0, f"docker build --target deps failed:\n{deps.stdout[-3000:]}\n{deps.stderr[-3000:]}"
        build = docker("build", "--network", "none", "-t", IMAGE, str(REPO), timeout=BUILD_TIMEOUT_S)
        assert build.returncode == 0, f"docker build failed:\n{build.stdout[-3000:]}\n{build.stderr[-3000:]}"
        print(f"docker build: {time.monotonic() - started:.1f} s")
        yield IMAGE
    finally:
        docker("rmi", "-f", IMAGE, DEPS_IMAGE, timeout=120)


@pytest.fixture
def clean_redis(redis_server: str) -> Iterator[str]:
    client = redis.Redis.from_url(redis_server, socket_timeout=5, socket_connect_timeout=5)
    client.flushdb()
    yield redis_server
    client.flushdb()
    client.close()


@pytest.mark.docker
@pytest.mark.timeout(BUILD_TIMEOUT_S + 300)
def test_the_image_builds_offline_and_serves_as_non_root(image: str, clean_redis: str) -> None:
    config = json.loads(docker("image", "inspect", image).stdout)[0]["Config"]
    assert config["User"] == "65534:65534"
    assert config["Entrypoint"] == ["python3", "-m", "ingress"]
    assert "8080/tcp" in config["ExposedPorts"]
    assert config["Healthcheck"]["Test"][0] == "CMD" and "/healthz" in " ".join(config["Healthcheck"]["Test"])

    port = free_port()
    name = f"lwt-ingress-{uuid.uuid4().hex[:8]}"
    # Host networking reaches the test Redis on loopback; the ingress binds loopback only.
    run = docker(
        "run", "-d", "--name", name, "--network", "host",
        "--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
        "--health-interval", "1s", "--health-start-period", "30s",
        "-e", f"LUKEWARM_REDIS_URL={clean_redis}",
        "-e", "LUKEWARM_INGRESS_HOST=127.0.0.1",
        "-e", f"LUKEWARM_INGRESS_PORT={port}",
        "-e", "LUKEWARM_ADMIN_TOKEN=packaging-admin",
        "-e", "LUKEWARM_PROXY_SECRET=packaging-secret",
        # Out of the capacity loop's lease: nothing to reconcile here.
        "-e", "LUKEWARM_RECONCILE_INTERVAL_S=0",
        image)
    assert run.returncode == 0, run.stderr
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: True if http_status(base + "/healthz") == 200 else None, 60, "/healthz answers 200")
        wait_for(lambda: True if http_status(base + "/readyz") == 200 else None, 30,
                 "/readyz answers 200 (Redis reached from the container)")
        # The image's own HEALTHCHECK command (run every second here) reports healthy.
        wait_for(lambda: True if docker("inspect", "-f", "{{.State.Health.Status}}", name).stdout.strip() == "healthy"
                 else None, 30, "the HEALTHCHECK reports healthy")

        ids = docker("exec", name, "python3", "-c", "import os; print(os.getuid(), os.getgid())")
        assert ids.stdout.split() == ["65534", "65534"], ids

        stopped = time.monotonic()
        stop = docker("stop", "-t", "45", name, timeout=90)
        assert stop.returncode == 0, stop.stderr
        state = json.loads(docker("inspect", "-f", "{{json .State}}", name).stdout)
        assert state["ExitCode"] == 0, f"SIGTERM must drain and exit 0: {docker('logs', name).stderr[-2000:]}"
        assert time.monotonic() - stopped < 40, "an idle ingress must not wait out its whole drain"
    finally:
        docker("rm", "-f", name)


# Run inside the image (stdlib only): what it holds, and whether everything `python -m ingress` can reach
# imports — every module of ours it imports (at module level or inside a function), transitively, and
# every other module those import.
IMAGE_PROBE = r'''
import ast, importlib.util, json, os, sys

ours = {"ingress", "shared", "runtime_proxy", "loadtests", "tests", "lukewarm"}

def module_file(name):
    spec = importlib.util.find_spec(name)
    return spec.origin if spec and spec.origin and spec.origin.endswith(".py") else None

def imports(path, package):
    tree = ast.parse(open(path, "rb").read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                mod = base + ("." + node.module if node.module else "")
            else:
                mod = node.module
            yield mod
            for alias in node.names:
                yield mod + "." + alias.name  # a submodule, or a name (then the module itself counts)

missing, third_party, seen, todo = set(), set(), set(), ["ingress", "ingress.__main__"]
while todo:
    name = todo.pop()
    if name in seen:
        continue
    seen.add(name)
    path = module_file(name)
    if path is None:
        continue
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    for imported in imports(path, package):
        top = imported.split(".")[0]
        if top in ours:
            try:
                found = importlib.util.find_spec(imported) is not None
            except ModuleNotFoundError:
                found = False
            if found:
                todo.append(imported)
            elif importlib.util.find_spec(imported.rpartition(".")[0] or imported) is None:
                missing.add(imported)
        elif top not in sys.stdlib_module_names and top != "__future__":
            third_party.add(top)

for top in sorted(third_party):
    if importlib.util.find_spec(top) is None:
        missing.add(top)

print(json.dumps({
    "app": sorted(os.listdir("/app")),
    "absent": {m: importlib.util.find_spec(m) is None
               for m in ("runtime_proxy", "loadtests", "tests", "lukewarm", "docker", "pynvml")},
    "reached": sorted(n for n in seen if n.split(".")[0] in ("ingress", "shared")),
    "missing": sorted(missing),
    "third_party": sorted(third_party),
    "code_writable": os.access("/app/ingress", os.W_OK) or os.access("/opt/lukewarm/site", os.W_OK),
    "uid": os.getuid(),
}))
'''


@pytest.mark.docker
@pytest.mark.timeout(BUILD_TIMEOUT_S + 300)
def test_the_image_holds_the_ingress_and_nothing_else(image: str) -> None:
    probe = docker("run", "--rm", "--network", "none", "--entrypoint", "python3", image, "-c", IMAGE_PROBE)
    assert probe.returncode == 0, probe.stderr
    found = json.loads(probe.stdout)
    assert found["app"] == ["ingress", "shared"]
    assert all(found["absent"].values()), found["absent"]
    assert found["missing"] == [], f"`python -m ingress` can import modules the image lacks: {found['missing']}"
    assert "ingress.app" in found["reached"] and "shared.settings" in found["reached"], found["reached"]
    assert {"aiohttp", "redis", "orjson"} <= set(found["third_party"]), found["third_party"]
    assert found["uid"] == 65534
    assert not found["code_writable"], "the code and its dependencies must be read-only to the user"


@pytest.mark.docker
@pytest.mark.timeout(BUILD_TIMEOUT_S + 120)
def test_a_filled_wheelhouse_is_reused_without_the_network(wheelhouse: Path) -> None:
    stamp = (wheelhouse / ".stamp").read_text()
    offline = {**os.environ, "PIP_NO_INDEX": "1", "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
               "PIP_EXTRA_INDEX_URL": "", "PIP_FIND_LINKS": "/nonexistent"}
    run = subprocess.run([str(REPO / "scripts" / "wheelhouse.sh")], check=False, capture_output=True, text=True, timeout=120,
                         env=offline)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "up to date" in run.stdout
    assert (wheelhouse / ".stamp").read_text() == stamp


def test_the_build_context_is_an_allowlist() -> None:
    lines = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()]
    rules = [line for line in lines if line and not line.startswith("#")]
    assert rules[0] == "*", "everything is left out first"
    assert {"!ingress/", "!shared/", "!build/wheelhouse/"} <= set(rules)
    assert not any(rule.startswith("!") and any(part in rule for part in
                   ("runtime_proxy", "loadtests", "tests", ".venv", ".git", "lukewarm/")) for rule in rules)
    dockerfile = (REPO / "Dockerfile").read_text()
    froms = re.findall(r"^FROM\s+(\S+)", dockerfile, re.MULTILINE)
    assert froms == ["${BASE_IMAGE}", "${BASE_IMAGE}"], froms
    assert "ARG BASE_IMAGE=lukewarm/python:bookworm" in dockerfile


# --------------------------------------------------------------------------------------------------
# systemd units
# --------------------------------------------------------------------------------------------------


def parse_unit(text: str) -> dict[str, list[str]]:
    """``Section.Key`` → its values in order (comments and blank lines dropped; no continuations used)."""
    section, found = "", {}  # type: ignore[var-annotated]
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        found.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return found


def unit(name: str) -> dict[str, list[str]]:
    return parse_unit((DEPLOY / name).read_text())


def one(values: dict[str, list[str]], key: str) -> str:
    assert key in values, f"{key} is not set"
    return values[key][-1]


def seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|sec|min)?", value)
    assert match, f"unexpected time span {value!r}"
    return float(match.group(1)) * (60 if match.group(2) == "min" else 1)


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        missing("systemd-analyze is not installed (Debian: apt-get install systemd)")
    return str(found)


def readme_dropin() -> str:
    """The credentials drop-in deploy/README.md shows for the ingress."""
    blocks = re.findall(r"```\n(\[Service\]\n.*?)```", (DEPLOY / "README.md").read_text(), re.DOTALL)
    dropins = [block for block in blocks if "LoadCredential=" in block]
    assert dropins, "deploy/README.md shows a LoadCredential drop-in for the ingress"
    return dropins[0]


BAD_OUTPUT = re.compile(r"ignoring|unknown|invalid|failed|not executable|error|no such", re.IGNORECASE)


def test_systemd_analyze_verify_passes_on_the_units(tmp_path: Path) -> None:
    analyze = systemd_analyze()
    for name in UNITS:
        text = (DEPLOY / name).read_text()
        # verify checks that ExecStart's binary exists: point it at this interpreter, arguments unchanged.
        text, count = re.subn(r"^ExecStart=\S+", f"ExecStart={sys.executable}", text, flags=re.MULTILINE)
        assert count == 1, f"{name} has one ExecStart="
        (tmp_path / name).write_text(text)
    dropin = tmp_path / "lukewarm-ingress.service.d" / "credentials.conf"
    dropin.parent.mkdir()
    dropin.write_text(readme_dropin())
    run = subprocess.run([analyze, "verify", "--man=no", *UNITS], check=False, capture_output=True, text=True, timeout=60,
                         cwd=tmp_path)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    assert not BAD_OUTPUT.search(output), output


def test_the_units_expose_little(tmp_path: Path) -> None:
    """`systemd-analyze security` (offline) scores both well below the 9+ of an unhardened unit."""
    analyze = systemd_analyze()
    if "--offline" not in subprocess.run([analyze, "--help"], check=False, capture_output=True, text=True, timeout=30).stdout:
        pytest.skip("this systemd-analyze cannot score unit files offline (systemd < 250)")
    for name, most in (("lukewarm-ingress.service", 2.5), ("lukewarm-proxy.service", 6.0)):
        (tmp_path / name).write_text((DEPLOY / name).read_text())
        run = subprocess.run([analyze, "security", "--offline=yes", "--no-pager", f"--threshold={int(most * 10)}",
                              str(tmp_path / name)], check=False, capture_output=True, text=True, timeout=60)
        level = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", run.stdout)
        assert run.returncode == 0 and level, f"{name}: exposure above {most}:\n{run.stdout[-3000:]}{run.stderr}"


# What runs a daemon in a private mount namespace: the proxy's per-replica tmpfs would stay invisible to dockerd.
MOUNT_NAMESPACE_KEYS = ("ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "ReadWritePaths",
                        "ReadOnlyPaths", "InaccessiblePaths", "TemporaryFileSystem", "BindPaths", "ProtectKernelTunables",
                        "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups", "ProtectProc",
                        "ProcSubset", "PrivateMounts", "MountFlags", "RootDirectory", "RootImage")


def test_the_units_say_what_the_deployment_relies_on() -> None:
    ingress, proxy = unit("lukewarm-ingress.service"), unit("lukewarm-proxy.service")
    drain = max(IngressSettings().drain_timeout_s, ProxySettings().drain_timeout_s)
    for values in (ingress, proxy):
        assert one(values, "Service.NoNewPrivileges") == "yes"
        assert one(values, "Service.LimitNOFILE") == "65536"
        assert one(values, "Service.Restart") == "on-failure"
        assert one(values, "Service.KillSignal") == "SIGTERM"
        assert seconds(one(values, "Service.TimeoutStopSec")) > drain, "systemd must outwait the drain"
        assert values["Service.EnvironmentFile"][0] == "/etc/lukewarm/env"
        assert values["Service.ExecStart"][0].endswith(("-m ingress", "-m runtime_proxy"))

    # The ingress: a user of its own, the system read-only, nothing writable (it keeps no state on disk).
    assert one(ingress, "Service.User") == "lukewarm"
    assert one(ingress, "Service.ProtectSystem") == "strict"
    assert one(ingress, "Service.ProtectHome") == "yes"
    assert one(ingress, "Service.PrivateTmp") == "yes"
    assert ingress.get("Service.CapabilityBoundingSet") == [""]
    assert "Service.ReadWritePaths" not in ingress
    assert "Service.StateDirectory" not in ingress, "systemd would chown the proxy's state directory to it"

    # The proxy: root, its state directory, the GPUs, its containers left running on stop, and no
    # private mount namespace.
    assert one(proxy, "Service.User") == "root"
    assert one(proxy, "Service.StateDirectory") == "lukewarm"
    assert "/var/lib/" + one(proxy, "Service.StateDirectory") == ProxySettings().state_dir
    assert one(proxy, "Service.KillMode") == "process"
    devices = proxy.get("Service.DeviceAllow", [])
    assert any(rule.split()[0].startswith("char-nvidia") and "rw" in rule.split()[1] for rule in devices), devices
    for rule in devices:
        path = rule.split()[0]
        assert not (path.startswith("/dev/") and any(c in path for c in "*?[")), \
            f"DeviceAllow={rule}: systemd takes no glob in a device path (a char-<group> glob instead)"
    leaked = [key for key in MOUNT_NAMESPACE_KEYS if f"Service.{key}" in proxy]
    assert not leaked, f"the proxy unit must not run in a private mount namespace: {leaked}"


# --------------------------------------------------------------------------------------------------
# The example settings
# --------------------------------------------------------------------------------------------------

ASSIGNMENT = re.compile(r"^#?(LUKEWARM_[A-Z0-9_]+)=(.*)$")


def example_assignments() -> list[tuple[str, str, bool]]:
    """(name, value, active) for each ``LUKEWARM_X=value`` line, commented out (an example) or not."""
    found = []
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = ASSIGNMENT.match(line.strip())
        if match:
            found.append((match.group(1), match.group(2), not line.startswith("#")))
    return found


def fields() -> dict[str, type]:
    kinds: dict[str, type] = {}
    for cls in (IngressSettings, ProxySettings):
        hints: dict[str, Any] = get_type_hints(cls)
        for field in dataclasses.fields(cls):
            kinds[field.name] = hints[field.name]
    return kinds


def test_the_env_example_documents_every_setting_and_nothing_else() -> None:
    kinds = fields()
    named: set[str] = set()
    for name, value, _active in example_assignments():
        field = name.removeprefix("LUKEWARM_").lower()
        if field.endswith("_file") and field not in kinds:
            field = field.removesuffix("_file")
            assert kinds.get(field) is str, f"{name}: only text settings have a _FILE form"
            assert value.startswith("/"), f"{name}: an absolute path"
            named.add(field)
            continue
        assert field in kinds, f"{name} is no setting of shared/settings.py"
        named.add(field)
        kind = kinds[field]
        if kind is bool:
            assert value in ("true", "false"), f"{name}={value}"
        elif kind in (int, float) and value:
            kind(value)  # raises on a value the daemon would refuse
    assert sorted(set(kinds) - named) == [], "settings the example does not document"


def test_the_env_example_values_hold_together() -> None:
    values = {name: value for name, value, active in example_assignments() if active}
    # Secrets only as files; the required ones are there.
    for secret in ("LUKEWARM_ADMIN_TOKEN", "LUKEWARM_PROXY_SECRET", "LUKEWARM_REDIS_URL"):
        assert secret not in values and secret + "_FILE" in values, secret
    assert "LUKEWARM_BASE_DOMAIN" in values
    drain = float(values["LUKEWARM_DRAIN_TIMEOUT_S"])
    for name in UNITS:
        assert seconds(one(unit(name), "Service.TimeoutStopSec")) > drain, name
    urls = [value for name, value, _ in example_assignments() if name == "LUKEWARM_REDIS_URL"]
    assert any(is_sentinel_url(url) for url in urls), "a Sentinel example"
    for url in urls:
        check_redis_url(url)  # SystemExit on a URL the daemons would refuse
        if is_sentinel_url(url):
            parsed = parse_sentinel_url(url)
            assert len(parsed.sentinels) == 3 and parsed.service == "lukewarm"
    advertise = [value for name, value, _ in example_assignments() if name == "LUKEWARM_ADVERTISE_URL"]
    assert advertise and all(url.startswith("http://") for url in advertise)
