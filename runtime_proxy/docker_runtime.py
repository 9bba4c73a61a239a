"""The Docker runtime: the only module that imports the Docker SDK.

The SDK is blocking, so every call goes through ``asyncio.to_thread`` with
a bounded HTTP timeout on the client itself.

Images through a registry: a version is pinned to ``<registry>/<repo>@sha256:<manifest digest>``
(what any host can pull, and what names one content forever); pulls log in with the entry for
that registry of a Docker ``config.json`` (``LUKEWARM_REGISTRY_AUTH_FILE``).
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import os
import re
import threading
import time
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any

import docker
import docker.errors
import docker.types
import orjson

from runtime_proxy import freezer
from runtime_proxy.runtime import (
    HARNESS_IN_CONTAINER,
    RUN_DIR_IN_CONTAINER,
    SOCKET_NAME,
    ExitInfo,
    FoundReplica,
    LaunchSpec,
    RuntimeFailure,
    harness_env,
    labels_for,
)
from shared.messages import VersionSpec

# A replica's user: nobody. The model never runs as root, even inside its container.
CONTAINER_USER = "65534:65534"
PIDS_LIMIT = 256
TMPFS_MB = 64
OPEN_FILES = 4096
# A registry login file is a few entries; anything larger is not one (and is not read whole).
MAX_AUTH_FILE_BYTES = 1024 * 1024
# A manifest digest as registries name content: what `name@<digest>` may carry.
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
# Docker Hub's names for itself, as config.json keys and references write them.
_DOCKER_HUB = {"docker.io", "index.docker.io", "registry-1.docker.io"}


def _name_of(reference: str) -> str:
    """A reference without its tag or digest (``reg:5000/a/b:1@sha256:…`` → ``reg:5000/a/b``)."""
    name = reference.split("@", 1)[0]
    slash = name.rfind("/")
    colon = name.rfind(":")
    return name[:colon] if colon > slash else name


def registry_host(reference: str) -> str:
    """The registry a reference is pulled from, by Docker's rule: the first component when it looks like
    a host (a dot, a port, ``localhost``), else Docker Hub (``docker.io``)."""
    first, slash, _ = reference.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
        host = first.lower()
        return "docker.io" if host in _DOCKER_HUB else host
    return "docker.io"


def pinned_reference(image: str, repo_digests: Iterable[str]) -> str:
    """The ``name@sha256:…`` that pins ``image``: among the image's RepoDigests (what the engine knows it by
    in a registry), the one asked for, else one of the same name; "" when none has that name (an image
    only built here: no registry could hand it back).

    Only the asked name counts: a digest of another repository is not this reference's to run, and a
    host that never had the image could pull only that other name.
    """
    wanted = _name_of(image)
    same_name = sorted(d for d in repo_digests
                       if "@" in d and _name_of(d) == wanted and _DIGEST.fullmatch(d.split("@", 1)[1]))
    if image in same_name:
        return image
    return same_name[0] if same_name else ""


def _host_of_key(key: str) -> str:
    """A config.json ``auths`` key as a bare host: ``https://reg.example.com:5000/v2/`` → ``reg.example.com:5000``."""
    host = key.split("://", 1)[-1].split("/", 1)[0].lower()
    return "docker.io" if host in _DOCKER_HUB else host


def _login_of(entry: Any, key: str) -> dict[str, str] | None:
    """One ``auths`` entry as the engine's auth config; None when it holds no login (a credential helper's)."""
    if not isinstance(entry, dict):
        raise ValueError(f"auths[{key!r}] is not an object")
    if entry.get("identitytoken"):
        return {"identitytoken": str(entry["identitytoken"]), "serveraddress": _host_of_key(key)}
    username, password = entry.get("username"), entry.get("password")
    if entry.get("auth"):
        try:
            username, sep, password = base64.b64decode(str(entry["auth"]), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            raise ValueError(f"auths[{key!r}].auth is not base64 of user:password") from None
        if not sep:
            raise ValueError(f"auths[{key!r}].auth is not base64 of user:password")
    if not username and not password:
        return None
    if not isinstance(username, str) or not isinstance(password, str):
        raise ValueError(f"auths[{key!r}]: username and password must be strings")
    return {"username": username, "password": password, "serveraddress": _host_of_key(key)}


def parse_registry_auths(data: bytes) -> dict[str, dict[str, str]]:
    """The logins of a Docker ``config.json`` by registry host: ``{"auths": {host: {"auth": base64(user:pw)}
    | {"username", "password"} | {"identitytoken"}}}``. Entries with no login of their own (``credsStore``,
    ``credHelpers``: helper programs this daemon does not run) are left out. ValueError when it is not such
    a document."""
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("auths", {}), dict):
        raise ValueError('expected {"auths": {"<registry host>": {"auth": "<base64 user:password>"}}}')
    logins = {}
    for key, entry in doc.get("auths", {}).items():
        login = _login_of(entry, key)
        if login is not None:
            logins[_host_of_key(key)] = login
    return logins


def read_registry_auths(path: str) -> dict[str, dict[str, str]]:
    """``parse_registry_auths`` of the file at ``path``, read only up to ``MAX_AUTH_FILE_BYTES``. Blocking;
    ValueError naming the file when it cannot be read or is not a login file."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_AUTH_FILE_BYTES + 1)
    except OSError as exc:
        raise ValueError(f"registry login file {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_AUTH_FILE_BYTES:
        raise ValueError(f"registry login file {path}: larger than {MAX_AUTH_FILE_BYTES} bytes")
    try:
        return parse_registry_auths(data)
    except ValueError as exc:
        raise ValueError(f"registry login file {path}: {exc}") from None


def _one_line(text: Any) -> str:
    return " ".join(str(text).split())[:300]


def _drain(stream: Iterable[Any], deadline: float, what: str = "") -> list[dict[str, Any]]:
    """Read a pull's or push's progress to its end; its ``error`` message (the engine answers 200 and
    reports failure in the stream) or a passed ``deadline`` is a RuntimeFailure (its text after ``what``).
    The messages read."""
    prefix = f"{what}: " if what else ""
    messages = []
    try:
        for message in stream:
            if isinstance(message, dict):
                if message.get("error"):
                    raise RuntimeFailure("image_unavailable", prefix + _one_line(message["error"]))
                messages.append(message)
            if time.monotonic() > deadline:
                raise RuntimeFailure("image_unavailable", prefix + "took too long")
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()  # leaving early lets the response, and its connection, go
    return messages


def docker_available(timeout_s: float = 3.0) -> bool:
    """True when a Docker engine answers a ping within ``timeout_s``."""
    try:
        client = docker.from_env(timeout=timeout_s)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:  # noqa: BLE001 - any failure means "no engine here"
        return False


def container_options(launch: LaunchSpec, log_max_mb: int = 10) -> dict[str, Any]:
    """The create() options of a replica: the hardening of DESIGN.md lives here."""
    spec = launch.spec
    memory = f"{spec.memory_mb}m"
    return {
        # The content the version was pinned to at deploy, when known: a retag changes nothing here.
        "image": spec.image_id or spec.image,
        "command": ["python3", HARNESS_IN_CONTAINER],
        "name": f"lw-{launch.replica_id}",
        "labels": labels_for(launch),
        "environment": harness_env(spec, f"{RUN_DIR_IN_CONTAINER}/{SOCKET_NAME}", gpu_uuid=launch.gpu_uuid),
        "volumes": {
            str(launch.harness_path): {"bind": HARNESS_IN_CONTAINER, "mode": "ro"},
            str(launch.run_dir): {"bind": RUN_DIR_IN_CONTAINER, "mode": "rw"},
        },
        "network_mode": "none",
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges"],
        "read_only": True,
        "tmpfs": {"/tmp": f"rw,noexec,nosuid,size={TMPFS_MB}m"},
        "pids_limit": PIDS_LIMIT,
        "nano_cpus": int(spec.cpus * 1e9),
        "ulimits": [docker.types.Ulimit(name="nofile", soft=OPEN_FILES, hard=OPEN_FILES)],
        # A model printing in a loop must not fill the host's disk through Docker's log.
        "log_config": docker.types.LogConfig(type="json-file", config={"max-size": f"{log_max_mb}m", "max-file": "2"}),
        "ipc_mode": "private",
        "mem_limit": memory,
        "memswap_limit": memory,  # no swap: an over-limit model is OOM-killed, not slowed to a crawl
        "user": CONTAINER_USER,
        # A tiny init reaps zombies and forwards SIGTERM, so stop takes ms, not 10 s.
        "init": True,
        "detach": True,
        **({"device_requests": [docker.types.DeviceRequest(device_ids=[launch.gpu_uuid], capabilities=[["gpu"]])]}
           if launch.gpu_uuid else {}),
    }


class DockerRuntime:
    """Replicas as Docker containers on the local engine."""

    name = "docker"

    def __init__(self, api_timeout_s: float = 30.0, log_max_mb: int = 10, registry_auth_file: str = "",
                 pull_timeout_s: float = 600.0) -> None:
        self._api_timeout_s = api_timeout_s
        self._log_max_mb = log_max_mb
        self._registry_auth_file = registry_auth_file
        self._pull_timeout_s = pull_timeout_s
        self._client: docker.DockerClient | None = None
        # The login file as last read, and the (mtime, size) it was read at: a rotated password is
        # picked up at the next pull, with no restart, and an unchanged file is not parsed again.
        self._auths: dict[str, dict[str, str]] = {}
        self._auths_stamp: tuple[int, int] | None = None
        self._auths_lock = threading.Lock()  # pulls run in worker threads, several at once
        # Containers paused through dockerd (no writable freezer here, or found so at re-adoption): those
        # dockerd must unpause itself, as it knows them paused. All others are frozen by us directly.
        self._docker_paused: set[str] = set()

    def _docker(self) -> docker.DockerClient:
        if self._client is None:
            self._client = docker.from_env(timeout=self._api_timeout_s)
        return self._client

    async def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except docker.errors.ImageNotFound as exc:
            raise RuntimeFailure("image_unavailable", f"image not found: {exc.explanation or exc}") from exc
        except docker.errors.NotFound as exc:
            raise RuntimeFailure("replica_gone", f"container not found: {exc.explanation or exc}") from exc
        except docker.errors.APIError as exc:
            raise RuntimeFailure("runtime_error", f"docker: {exc.explanation or exc}") from exc
        except docker.errors.DockerException as exc:
            raise RuntimeFailure("runtime_error", f"docker: {exc}") from exc

    async def has_image(self, image: str) -> bool:
        try:
            await self._call(self._docker().images.get, image)
            return True
        except RuntimeFailure as exc:
            if exc.type == "image_unavailable":
                return False
            raise

    def _login_for(self, image: str) -> dict[str, str] | None:
        """This host's login for ``image``'s registry from the login file (None: none there, and the
        engine's client pulls as it would anyway). Blocking (a stat, a read when the file changed)."""
        if not self._registry_auth_file:
            return None
        with self._auths_lock:
            try:
                st = os.stat(self._registry_auth_file)
            except OSError as exc:
                raise ValueError(f"registry login file {self._registry_auth_file}: {exc.strerror or exc}") from None
            if self._auths_stamp != (st.st_mtime_ns, st.st_size):
                self._auths = read_registry_auths(self._registry_auth_file)
                self._auths_stamp = (st.st_mtime_ns, st.st_size)
            return self._auths.get(registry_host(image))

    def _pull_blocking(self, client: docker.DockerClient, image: str, deadline: float) -> None:
        try:
            login = self._login_for(image)
        except ValueError as exc:
            raise RuntimeFailure("image_unavailable", str(exc)) from None
        name, _, digest = image.partition("@")
        repository = _name_of(name)
        # The engine takes a digest where a tag goes; a reference with neither means "latest", as for docker pull.
        tag = digest or name[len(repository) + 1:] or "latest"
        try:
            _drain(client.api.pull(repository, tag=tag, stream=True, decode=True, auth_config=login), deadline)
        except docker.errors.APIError as exc:
            # Here a 404 is the registry's "no such image or no access", not the container one _call reads it as.
            raise RuntimeFailure("image_unavailable", _one_line(exc.explanation or exc)) from None

    async def pull(self, image: str) -> None:
        """Pull ``image`` (a ``name@sha256:…`` brings exactly that content) with the login file's entry for
        its registry; within ``pull_timeout_s`` or RuntimeFailure ``image_unavailable``, as for any failure
        (a refused login, an unknown digest, a registry that does not answer)."""
        deadline = time.monotonic() + self._pull_timeout_s
        try:
            # The thread checks the deadline between progress messages; wait_for also covers an engine
            # that sends none (the SDK reads a pull with no timeout of its own).
            await asyncio.wait_for(self._call(self._pull_blocking, self._docker(), image, deadline),
                                   self._pull_timeout_s + 1.0)
        except TimeoutError:
            raise RuntimeFailure("image_unavailable",
                                 f"cannot pull image {image!r}: no result within {self._pull_timeout_s:g} s") from None
        except RuntimeFailure as exc:
            raise RuntimeFailure("image_unavailable", f"cannot pull image {image!r}: {exc}") from exc

    async def resolve_image(self, image: str) -> str:
        """What a version of ``image`` runs forever: ``name@sha256:<manifest digest>`` when a registry knows
        the image by the asked name (any host can pull that, and it names one content), else the content id
        ``sha256:…`` (an image only built here)."""
        if not await self.has_image(image):
            await self.pull(image)
        attrs = (await self._call(self._docker().images.get, image)).attrs
        # The engine answers `name@sha256:<image id>` with that image whatever its name: insist that the
        # image really carries the name asked for, or one customer's name could reach another's image.
        wanted = _name_of(image)
        names = {_name_of(n) for n in (attrs.get("RepoTags") or []) + (attrs.get("RepoDigests") or [])}
        if wanted not in names:
            raise RuntimeFailure("image_unavailable", f"no image named {wanted} holds {image}")
        return pinned_reference(image, attrs.get("RepoDigests") or []) or str(attrs["Id"])

    async def pullable(self, image: str) -> bool:
        """Whether removing ``image`` here loses nothing: a registry knows it by its name and digest (so
        ``pull name@sha256:…`` brings it back), or it is gone already."""
        try:
            attrs = (await self._call(self._docker().images.get, image)).attrs
        except RuntimeFailure as exc:
            if exc.type == "image_unavailable":
                return True
            raise
        return bool(pinned_reference(image, attrs.get("RepoDigests") or []))

    async def create(self, launch: LaunchSpec) -> str:
        container = await self._call(self._docker().containers.create, **container_options(launch, self._log_max_mb))
        return str(container.id)

    async def _container(self, handle: str) -> Any:
        return await self._call(self._docker().containers.get, handle)

    async def start(self, handle: str) -> None:
        await self._call(self._docker().api.start, handle)

    async def pause(self, handle: str) -> None:
        """Freeze the container's cgroup ourselves (see ``runtime_proxy.freezer``); through dockerd only
        where no freezer file is writable here."""
        file = freezer.locate(handle)
        if file is not None:
            try:
                await freezer.freeze(file)
                return
            except freezer.FreezeFailed as exc:
                raise RuntimeFailure("pause_refused", f"could not pause: {exc}") from exc
            except OSError:
                pass  # the cgroup is not ours to write after all (or just went): ask dockerd
        await self._call(self._docker().api.pause, handle)
        self._docker_paused.add(handle)

    async def unpause(self, handle: str) -> None:
        """A thaw is one write on the event loop: microseconds, where ``docker unpause`` takes ~15 ms."""
        if handle not in self._docker_paused:
            file = freezer.locate(handle)
            if file is not None:
                try:
                    freezer.thaw(file)
                    return
                except OSError:
                    pass
        await self._call(self._docker().api.unpause, handle)
        self._docker_paused.discard(handle)

    def _thaw_before_signal(self, handle: str) -> None:
        """A frozen cgroup holds signals (v1): dockerd would wait out stop and kill timeouts on it."""
        if handle in self._docker_paused:
            self._docker_paused.discard(handle)  # dockerd unpauses its own paused containers on stop/kill
            return
        file = freezer.locate(handle)
        if file is not None and freezer.is_frozen(file):
            try:
                freezer.thaw(file)
            except OSError:
                pass  # gone meanwhile: nothing left to hold a signal

    async def stop(self, handle: str, timeout_s: float) -> None:
        self._thaw_before_signal(handle)
        try:
            await self._call(self._docker().api.stop, handle, timeout=max(0, int(timeout_s)))
        except RuntimeFailure as exc:
            if exc.type != "replica_gone":
                raise

    async def kill(self, handle: str) -> None:
        self._thaw_before_signal(handle)
        try:
            await self._call(self._docker().api.kill, handle)
        except RuntimeFailure:
            pass  # already dead is what we wanted

    async def remove_image(self, image: str) -> None:
        """Remove a model image; one still used by any container (running or not) is kept."""
        try:
            await self._call(self._docker().images.remove, image, noprune=False)
        except RuntimeFailure as exc:
            if exc.type not in {"image_unavailable", "replica_gone"}:
                raise

    async def remove(self, handle: str) -> None:
        self._thaw_before_signal(handle)
        try:
            await self._call(self._docker().api.remove_container, handle, force=True)
        except RuntimeFailure as exc:
            if exc.type != "replica_gone":
                raise

    async def exit_info(self, handle: str) -> ExitInfo | None:
        try:
            attrs = await self._call(self._docker().api.inspect_container, handle)
        except RuntimeFailure as exc:
            if exc.type == "replica_gone":
                return ExitInfo(exit_code=None, detail="container removed")
            raise
        state = attrs.get("State", {})
        if state.get("Running") or state.get("Paused"):
            return None
        if state.get("Status") == "created":
            return None
        return ExitInfo(
            exit_code=state.get("ExitCode"),
            oom_killed=bool(state.get("OOMKilled")),
            detail=state.get("Error") or "",
        )

    async def exited(self, handles: Collection[str]) -> set[str]:
        if not handles:
            return set()
        # Ids only (quiet), of Lukewarm's live containers: a few bytes per replica to parse, whatever the labels.
        alive = await self._call(self._docker().api.containers, quiet=True,
                                 filters={"status": ["running", "paused"], "label": "lukewarm.replica"})
        return set(handles) - {str(c["Id"]) for c in alive}

    async def list_replicas(self, proxy_id: str) -> list[FoundReplica]:
        containers = await self._call(
            self._docker().containers.list, all=True, filters={"label": f"lukewarm.proxy={proxy_id}"}
        )
        found = []
        for container in containers:
            labels = container.labels or {}
            try:
                spec = VersionSpec.from_dict(orjson.loads(labels["lukewarm.spec"]))
            except (KeyError, ValueError, TypeError):
                continue  # not ours to adopt: labels from an incompatible version
            handle, state = str(container.id), container.status
            if state == "paused":
                self._docker_paused.add(handle)
            elif state == "running":
                file = freezer.locate(handle)
                if file is not None and freezer.is_frozen(file):
                    # Frozen by us before a restart (dockerd calls it running) or caught mid-freeze:
                    # finish the freeze so the replica is what the state says.
                    state = "paused"
                    try:
                        await freezer.freeze(file)
                    except (OSError, freezer.FreezeFailed):
                        state = "running"
            found.append(FoundReplica(
                handle=handle, replica_id=labels.get("lukewarm.replica", container.name),
                spec=spec, state=state, run_dir=Path(labels.get("lukewarm.run_dir", "")),
                gpu_uuid=labels.get("lukewarm.gpu") or None,
            ))
        return found

    def owns_peer(self, handle: str, pid: int) -> bool:
        """The process's cgroup names this container (v1 and v2, cgroupfs and systemd drivers)."""
        try:
            with open(f"/proc/{pid}/cgroup", encoding="ascii", errors="replace") as f:
                return len(handle) == 64 and handle in f.read()
        except OSError:
            return False

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await asyncio.to_thread(client.close)


def build_image(context_dir: str, tag: str, timeout_s: float = 600.0) -> str:
    """Build a model image from a local directory (no registry: its FROM must be local). Blocking."""
    try:
        client = docker.from_env(timeout=int(timeout_s))
    except docker.errors.DockerException as exc:
        raise RuntimeFailure("image_build_failed", f"cannot build {tag}: no Docker engine answers ({exc})") from None
    try:
        image, _ = client.images.build(path=context_dir, tag=tag, rm=True, pull=False)
        return str(image.id)
    except docker.errors.BuildError as exc:
        lines = [str(chunk.get("stream") or chunk.get("error") or "").strip() for chunk in exc.build_log]
        tail = " | ".join(line for line in lines if line)[-400:]
        raise RuntimeFailure("image_build_failed", f"cannot build {tag} from {context_dir}: {exc.msg} ({tail})") from None
    except docker.errors.APIError as exc:
        raise RuntimeFailure("image_build_failed", f"cannot build {tag}: {exc.explanation or exc}") from None
    finally:
        client.close()


def push_image(image: str, repository: str, tag: str, auth_file: str = "", timeout_s: float = 600.0) -> str:
    """Tag the local ``image`` as ``repository:tag``, push it, and return what was pushed as
    ``repository@sha256:<manifest digest>`` (what a deploy pins). Logs in with ``auth_file``'s entry for the
    registry when it has one, else as the Docker client would (``~/.docker/config.json``). Blocking, within
    ``timeout_s``; RuntimeFailure ``image_push_failed`` with one line on any failure."""
    what = f"cannot push {repository}:{tag}"
    try:
        login = read_registry_auths(auth_file).get(registry_host(repository)) if auth_file else None
    except ValueError as exc:
        raise RuntimeFailure("image_push_failed", f"{what}: {exc}") from None
    deadline = time.monotonic() + timeout_s
    try:
        client = docker.from_env(timeout=int(timeout_s))
    except docker.errors.DockerException as exc:
        raise RuntimeFailure("image_push_failed", f"{what}: no Docker engine answers ({exc})") from None
    try:
        client.api.tag(image, repository, tag)
        stream = client.api.push(repository, tag=tag, stream=True, decode=True, auth_config=login)
        messages = _drain(stream, deadline, what)
        # The engine reports the manifest digest it pushed in an "aux" message; RepoDigests, which the
        # push also updates, is the fallback for an engine that does not.
        digests = [str(m["aux"]["Digest"]) for m in messages
                   if isinstance(m.get("aux"), dict) and m["aux"].get("Digest")]
        if not digests:
            digests = [d.split("@", 1)[1] for d in client.api.inspect_image(image).get("RepoDigests") or []
                       if d.split("@", 1)[0] == repository]
        if not digests or not _DIGEST.fullmatch(digests[-1]):
            raise RuntimeFailure("image_push_failed", f"{what}: the registry answered no manifest digest")
        return f"{repository}@{digests[-1]}"
    except RuntimeFailure as exc:
        raise RuntimeFailure("image_push_failed", str(exc)) from None
    except docker.errors.DockerException as exc:
        detail = exc.explanation if isinstance(exc, docker.errors.APIError) else exc
        raise RuntimeFailure("image_push_failed", f"{what}: {_one_line(detail)}") from None
    finally:
        client.close()
