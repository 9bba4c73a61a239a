"""A real image registry for tests: Debian's ``docker-registry`` (distribution 2.8) on 127.0.0.1 and a
free port, with its own config and storage under a test's temporary directory, optionally behind an
htpasswd login. Docker allows plain HTTP to 127.0.0.0/8 registries, so no TLS is needed.

Every wait is bounded; the process is stopped (SIGTERM, then SIGKILL) on the way out.
"""
from __future__ import annotations

import base64
import contextlib
import dataclasses
import shutil
import subprocess
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path

import orjson

from loadtests.common import free_port, stop_process

REGISTRY_BINARY = "docker-registry"


def registry_binary() -> str | None:
    """The registry's executable, or None when the package is not installed."""
    return shutil.which(REGISTRY_BINARY) or next(
        (p for p in ("/usr/bin/docker-registry", "/usr/sbin/docker-registry") if Path(p).exists()), None)


def bcrypt_hash(password: str) -> str | None:
    """A bcrypt hash for htpasswd (the only scheme the registry accepts), from what this host has:
    apache2-utils' ``htpasswd``, Python's ``bcrypt``, or libcrypt through ``crypt``; None with none."""
    tool = shutil.which("htpasswd")
    if tool:
        out = subprocess.run([tool, "-nbB", "u", password], capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and ":" in out.stdout:
            return out.stdout.strip().split(":", 1)[1]
    try:
        import bcrypt  # type: ignore[import-not-found]

        return str(bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode())
    except ImportError:
        pass
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # crypt goes in 3.13; the fallbacks above come first
        try:
            import crypt
        except ImportError:
            return None
    if crypt.METHOD_BLOWFISH not in crypt.methods:
        return None
    hashed = crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16))
    return hashed if hashed and hashed.startswith("$2") else None


@dataclasses.dataclass
class Login:
    username: str
    password: str
    # "htpasswd": checked by the registry; "silly": any Authorization header passes (no bcrypt on this host).
    scheme: str = "htpasswd"


@dataclasses.dataclass
class Registry:
    host: str  # "127.0.0.1:<port>": what image references start with
    root: Path
    login: Login | None
    proc: subprocess.Popen[bytes]

    @property
    def log_path(self) -> Path:
        return self.root / "registry.log"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def auth_file(self, path: Path, password: str | None = None) -> Path:
        """A Docker config.json at ``path`` holding this registry's login (``password`` instead of the
        right one, to try a wrong one)."""
        assert self.login is not None, "this registry takes no login"
        secret = f"{self.login.username}:{self.login.password if password is None else password}"
        path.write_bytes(orjson.dumps({"auths": {self.host: {"auth": base64.b64encode(secret.encode()).decode()}}}))
        path.chmod(0o600)
        return path

    def has_manifest(self, repository: str, reference: str, timeout_s: float = 5.0) -> bool:
        """Whether the registry serves ``repository``'s manifest ``reference`` (a tag or a digest)."""
        request = urllib.request.Request(f"http://{self.host}/v2/{repository}/manifests/{reference}", method="HEAD")
        request.add_header("Accept", "application/vnd.docker.distribution.manifest.v2+json")
        if self.login is not None:
            token = base64.b64encode(f"{self.login.username}:{self.login.password}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as resp:
                return resp.status == 200
        except urllib.error.HTTPError:
            return False


def _config(root: Path, port: int, login: Login | None) -> dict[str, object]:
    auth: dict[str, object] = {}
    if login is not None and login.scheme == "htpasswd":
        auth = {"htpasswd": {"realm": "lukewarm-test", "path": str(root / "htpasswd")}}
    elif login is not None:
        auth = {"silly": {"realm": "lukewarm-test", "service": "lukewarm-test"}}
    return {
        "version": 0.1,
        "log": {"level": "warn", "accesslog": {"disabled": True}},
        "storage": {"filesystem": {"rootdirectory": str(root / "data")}, "delete": {"enabled": True}},
        "http": {"addr": f"127.0.0.1:{port}", "secret": "lukewarm-test-only"},
        **({"auth": auth} if auth else {}),
    }


def _answers(host: str, timeout_s: float) -> bool:
    """The registry's API root answers (200, or 401 behind a login)."""
    try:
        with urllib.request.urlopen(f"http://{host}/v2/", timeout=timeout_s) as resp:
            return resp.status == 200
    except urllib.error.HTTPError as exc:
        return exc.code == 401
    except (urllib.error.URLError, OSError):
        return False


@contextlib.contextmanager
def running_registry(root: Path, login: Login | None = None, timeout_s: float = 30.0) -> Iterator[Registry]:
    """A registry serving from ``root`` (config, storage, log) until the block ends. ``login`` with scheme
    htpasswd needs a bcrypt hash (``bcrypt_hash``); RuntimeError when the binary is missing, the hash
    cannot be made, or the registry does not answer within ``timeout_s``."""
    binary = registry_binary()
    if binary is None:
        raise RuntimeError("docker-registry is not installed (apt-get install docker-registry)")
    root.mkdir(parents=True, exist_ok=True)
    if login is not None and login.scheme == "htpasswd":
        hashed = bcrypt_hash(login.password)
        if hashed is None:
            raise RuntimeError("no way to make a bcrypt hash here (htpasswd, bcrypt, crypt)")
        (root / "htpasswd").write_text(f"{login.username}:{hashed}\n")
    port = free_port()
    config = root / "config.yml"
    config.write_bytes(orjson.dumps(_config(root, port, login)))  # JSON is YAML: no YAML writer needed
    with open(root / "registry.log", "ab") as out:
        # No environment of ours: REGISTRY_* variables would override the config above.
        proc = subprocess.Popen([binary, "serve", str(config)], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    registry = Registry(host=f"127.0.0.1:{port}", root=root, login=login, proc=proc)
    try:
        deadline = time.monotonic() + timeout_s
        while not _answers(registry.host, 1.0):
            if proc.poll() is not None:
                raise RuntimeError(f"docker-registry exited with {proc.returncode}: {registry.log()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"docker-registry did not answer within {timeout_s:g} s: {registry.log()[-2000:]}")
            time.sleep(0.1)
        yield registry
    finally:
        stop_process(proc)
