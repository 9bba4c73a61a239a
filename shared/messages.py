"""The JSON shapes that cross process boundaries, as frozen dataclasses.

``VersionSpec`` is what a deploy stores and what a proxy needs to run a
replica; ``ChunkRequest``/``ChunkResult`` are the ingress ↔ proxy call.
Validation of client input lives here too, so the ingress and the CLI
refuse the same things with the same words.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

from shared.errors import DeadlinePassed, bad_request

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
BRANCH_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_./-]{0,99}$")
ENTRYPOINT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_]*$")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
RESERVED_POINTERS = {"latest"}
# Variables the proxy owns: the harness's, and the GPU ones (a CPU version asking for
# NVIDIA_VISIBLE_DEVICES=all would get every GPU where nvidia is Docker's default runtime).
RESERVED_ENV_PREFIXES = ("LUKEWARM_", "NVIDIA_", "CUDA_")
MAX_ENV_VARS = 64
MAX_ENV_BYTES = 32 * 1024


@dataclasses.dataclass(frozen=True)
class DeployLimits:
    """What a deploy may ask of a host (IngressSettings.max_memory_mb, max_cpus)."""

    max_memory_mb: int = 65_536
    max_cpus: float = 16.0


def check_name(kind: str, value: Any) -> str:
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        raise bad_request(f"{kind} must be 1-63 lowercase letters, digits, '-' or '_', got {value!r}")
    return value


def check_branch(value: Any) -> str:
    if not isinstance(value, str) or not BRANCH_RE.fullmatch(value) or ".." in value:
        raise bad_request(f"branch must be letters, digits, '_', '.', '-' or '/', got {value!r}")
    return value


def check_alias(value: Any) -> str:
    if not isinstance(value, str) or not NAME_RE.fullmatch(value) or value.isdigit() or value in RESERVED_POINTERS:
        raise bad_request(f"alias must be a name that is not a number nor 'latest', got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class Capacity:
    min: int = 0
    desired: int = 1
    max: int = 4


@dataclasses.dataclass(frozen=True)
class VersionSpec:
    """An immutable deployed version: what a proxy needs to run a replica."""

    customer: str
    model: str
    branch: str
    version: int
    image: str
    entrypoint: str = "main:predict"
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    batch_size: int | None = None
    gpu: bool = False
    memory_mb: int = 512
    cpus: float = 1.0
    gpu_memory_mb: int = 0
    capacity: Capacity = Capacity()
    idle_timeout_s: float = 300.0
    # ``idle_timeout_s: "auto"`` (shown so): each proxy learns the version's idle times and picks when
    # to pause, stop and pre-warm (runtime_proxy/keepwarm.py); ``idle_timeout_s`` is then its fallback.
    idle_auto: bool = False
    keep_warm: bool = False
    timeout_s: float = 60.0
    # Requests one replica takes at once (the autoscaler's target per replica); None: the host's setting.
    max_concurrency: int | None = None
    # A model with side effects: never hedged, and a chunk that may have run is never sent to another
    # proxy (the caller gets 502 proxy_unreachable instead): each chunk runs at most once.
    at_most_once: bool = False
    created_at: float = 0.0
    retired: bool = False
    # The image's content id (sha256:…) resolved at deploy: the version runs exactly this, forever.
    image_id: str = ""
    # Why the rollout of this version failed (it never got ready; latest stayed where it was).
    rollout_error: str = ""

    @property
    def key(self) -> str:
        """Identity of the version across the fleet: ``customer/model/branch/version``."""
        return f"{self.customer}/{self.model}/{self.branch}/{self.version}"

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if out.pop("idle_auto"):
            out["idle_timeout_s"] = "auto"
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "VersionSpec":
        known = {f.name for f in dataclasses.fields(cls)} - {"idle_auto"}
        values = {k: v for k, v in data.items() if k in known}
        if values.get("idle_timeout_s") == "auto":
            values["idle_timeout_s"], values["idle_auto"] = AUTO_FALLBACK_IDLE_S, True
        cap = values.get("capacity")
        if isinstance(cap, dict):
            values["capacity"] = Capacity(**cap)
        return cls(**values)


# What an "auto" idle timeout falls back to while a version's idle times say too little to predict, and
# what it prices a start at (memory-seconds): the 10-minute keep-alive that loadtests.keepwarm compares with.
AUTO_FALLBACK_IDLE_S = 600.0

# The settings a client may give at deploy time, and which of them PATCH may change.
DEPLOY_FIELDS = {
    "image", "entrypoint", "env", "batch_size", "gpu", "memory_mb", "cpus", "gpu_memory_mb",
    "capacity", "idle_timeout_s", "keep_warm", "timeout_s", "max_concurrency", "at_most_once",
}
PATCHABLE_FIELDS = {"capacity", "idle_timeout_s", "keep_warm", "timeout_s", "at_most_once"}


def _positive_int(body: dict[str, Any], name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise bad_request(f"{name} must be an integer from {low} to {high}")
    return value


def _positive_number(body: dict[str, Any], name: str, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= high:
        raise bad_request(f"{name} must be a number above 0 and at most {high:g}")
    return float(value)


def _bool(body: dict[str, Any], name: str) -> bool | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, bool):
        raise bad_request(f"{name} must be true or false")
    return value


def _capacity(value: Any) -> Capacity | None:
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) - {"min", "desired", "max"}:
        raise bad_request("capacity must be an object with min, desired and max")
    given = {name: _positive_int(value, name, 0, 1000) for name in ("min", "desired", "max")}
    low = given["min"] if given["min"] is not None else 0
    desired = given["desired"] if given["desired"] is not None else max(1, low)
    cap = Capacity(min=low, desired=desired,
                   max=given["max"] if given["max"] is not None else max(4, desired, low))
    if not cap.min <= cap.desired <= cap.max or cap.max < 1:
        raise bad_request("capacity must satisfy min <= desired <= max and max >= 1")
    return cap


def _env(env: Any) -> dict[str, str]:
    if not isinstance(env, dict) or not all(
        isinstance(k, str) and ENV_NAME_RE.fullmatch(k) and isinstance(v, str) and "\x00" not in v
        for k, v in env.items()
    ):
        raise bad_request("env must map variable names to strings")
    reserved = sorted(k for k in env if k.upper().startswith(RESERVED_ENV_PREFIXES))
    if reserved:
        raise bad_request(f"env may not set {', '.join(reserved[:5])}: LUKEWARM_*, NVIDIA_* and CUDA_* "
                          "are set by the proxy")
    size = sum(len(k.encode()) + len(v.encode()) for k, v in env.items())
    if len(env) > MAX_ENV_VARS or size > MAX_ENV_BYTES:
        raise bad_request(f"env may hold at most {MAX_ENV_VARS} variables and {MAX_ENV_BYTES // 1024} KB")
    return dict(env)


def validate_settings(body: Any, allowed: set[str], limits: DeployLimits = DeployLimits()) -> dict[str, Any]:
    """Check a deploy or PATCH body; return only the fields that were given."""
    if not isinstance(body, dict):
        raise bad_request("body must be a JSON object")
    unknown = set(body) - allowed
    if unknown:
        raise bad_request(f"unknown field(s): {', '.join(sorted(unknown))}")
    out: dict[str, Any] = {}
    if "image" in body:
        image = body["image"]
        if not isinstance(image, str) or not image or len(image) > 300 or any(c.isspace() for c in image):
            raise bad_request("image must be a non-empty image reference without spaces")
        out["image"] = image
    if body.get("entrypoint") is not None:
        if not isinstance(body["entrypoint"], str) or not ENTRYPOINT_RE.fullmatch(body["entrypoint"]):
            raise bad_request("entrypoint must look like 'module:function'")
        out["entrypoint"] = body["entrypoint"]
    if body.get("env") is not None:
        out["env"] = _env(body["env"])
    for name, low, high in (("batch_size", 1, 100_000), ("memory_mb", 32, limits.max_memory_mb),
                            ("gpu_memory_mb", 0, 1_048_576), ("max_concurrency", 1, 256)):
        value = _positive_int(body, name, low, high)
        if value is not None:
            out[name] = value
    if body.get("idle_timeout_s") == "auto":
        out["idle_timeout_s"], out["idle_auto"] = AUTO_FALLBACK_IDLE_S, True
        body = {k: v for k, v in body.items() if k != "idle_timeout_s"}
    elif isinstance(body.get("idle_timeout_s"), str):
        raise bad_request('idle_timeout_s must be "auto" or a number of seconds above 0')
    elif body.get("idle_timeout_s") is not None:
        out["idle_auto"] = False
    ceilings: tuple[tuple[str, float], ...] = (("idle_timeout_s", 7 * 86400), ("timeout_s", 3600),
                                               ("cpus", limits.max_cpus))
    for name, ceiling in ceilings:
        number = _positive_number(body, name, ceiling)
        if number is not None:
            out[name] = number
    if out.get("cpus") is not None and out["cpus"] < 0.05:
        raise bad_request("cpus must be at least 0.05")
    for name in ("gpu", "keep_warm", "at_most_once"):
        flag = _bool(body, name)
        if flag is not None:
            out[name] = flag
    cap = _capacity(body.get("capacity"))
    if cap is not None:
        out["capacity"] = cap
    return out


def validate_deploy(body: Any, limits: DeployLimits = DeployLimits()) -> dict[str, Any]:
    fields = validate_settings(body, DEPLOY_FIELDS, limits)
    if "image" not in fields:
        raise bad_request("image is required")
    return fields


def split_version_key(key: Any) -> tuple[str, str, str, int]:
    """``customer/model/branch/version`` (the branch may hold ``/``) → its parts; 400 when malformed."""
    if not isinstance(key, str) or key.count("/") < 3:
        raise bad_request("version must be customer/model/branch/number")
    customer, model, rest = key.split("/", 2)
    branch, _, number = rest.rpartition("/")
    if not (number.isascii() and number.isdigit()) or int(number) < 1:
        raise bad_request("version must be customer/model/branch/number")
    return check_name("customer", customer), check_name("model", model), check_branch(branch), int(number)


@dataclasses.dataclass(frozen=True)
class ChunkRequest:
    """One chunk of a request, as the ingress holds it (with the version it resolved)."""

    spec: VersionSpec
    inputs: list[Any]
    timeout_s: float
    request_id: str
    # Whether the proxy may start another replica for it when its replicas are all busy
    # (the ingress says no once the version runs capacity.max replicas across the fleet).
    may_start: bool = True
    batch: bool = False  # batch work (X-Lukewarm-Priority: batch) yields to on-demand requests in every queue
    # The same for every copy of this chunk (a retry, a hedge): a proxy runs one id at most once.
    chunk_id: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The wire form names the version; the proxy reads what it runs from the registry, not from us."""
        return {"version": self.spec.key, "created_at": self.spec.created_at, "inputs": self.inputs,
                "timeout_s": self.timeout_s, "request_id": self.request_id, "may_start": self.may_start,
                "batch": self.batch, "chunk_id": self.chunk_id}


@dataclasses.dataclass(frozen=True)
class ChunkCall:
    """A chunk as a proxy receives it: which version (and which deploy of that number), what to run."""

    version: str
    created_at: float
    inputs: list[Any]
    timeout_s: float
    request_id: str
    may_start: bool = True
    batch: bool = False
    replicas: int = 1  # for a warm-up: how many ready replicas of the version this host should run
    chunk_id: str = ""

    @classmethod
    def from_dict(cls, data: Any, needs_inputs: bool = True) -> "ChunkCall":
        if not isinstance(data, dict) or (needs_inputs and not isinstance(data.get("inputs"), list)):
            raise bad_request("chunk must be an object with version, created_at, timeout_s and inputs")
        split_version_key(data.get("version"))
        try:
            timeout_s = float(data["timeout_s"])
            created_at = float(data["created_at"])
        except (KeyError, TypeError, ValueError) as exc:
            raise bad_request(f"bad chunk: {type(exc).__name__}: {exc}") from None
        if not timeout_s > 0:
            raise DeadlinePassed("deadline passed before the chunk reached the proxy")
        request_id = data.get("request_id", "")
        replicas = data.get("replicas", 1)
        if isinstance(replicas, bool) or not isinstance(replicas, int) or not 1 <= replicas <= 256:
            raise bad_request("replicas must be an integer from 1 to 256")
        chunk_id = data.get("chunk_id", "")
        if not isinstance(chunk_id, str) or len(chunk_id) > 128 or not (chunk_id.isascii() and chunk_id.isprintable()):
            raise bad_request("chunk_id must be printable ASCII, at most 128 characters")
        return cls(version=data["version"], created_at=created_at, inputs=data.get("inputs") or [],
                   timeout_s=min(timeout_s, 86400.0), request_id=str(request_id)[:128],
                   may_start=data.get("may_start") is not False, batch=data.get("batch") is True,
                   replicas=replicas, chunk_id=chunk_id)


def _num(value: Any, kind: type, default: Any = 0) -> Any:
    """A heartbeat number: None (a figure not known yet, e.g. NVML before its first answer) is the default."""
    return default if value is None else kind(value)


@dataclasses.dataclass(frozen=True)
class ReplicaReport:
    """One replica as its proxy's heartbeat reports it."""

    replica_id: str
    version: str
    state: str  # starting | running | paused | stopped
    in_flight: int = 0
    concurrency: int = 1
    idle_s: float = 0.0
    memory_mb: int = 0
    cpus: float = 1.0
    gpu: bool = False
    gpu_uuid: str | None = None
    memory_used_mb: float | None = None  # from its cgroup, when it shows
    cpu_s: float | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ReplicaReport":
        version, state, in_flight, concurrency, memory_mb, cpus, gpu = cls.routing_fields(data)
        return cls(
            replica_id=str(data.get("replica_id", "")), version=version, state=state, in_flight=in_flight,
            concurrency=concurrency, idle_s=_num(data.get("idle_s"), float), memory_mb=memory_mb, cpus=cpus,
            gpu=gpu, gpu_uuid=str(data["gpu_uuid"]) if data.get("gpu_uuid") else None,
            memory_used_mb=_num(data.get("memory_used_mb"), float, None), cpu_s=_num(data.get("cpu_s"), float, None),
        )

    @staticmethod
    def routing_fields(data: dict[str, Any]) -> tuple[str, str, int, int, int, float, bool]:
        """What routing reads of a reported replica — version, state, in_flight, concurrency, memory_mb,
        cpus, gpu — read and checked as ``from_dict`` reads them. An ingress reads the fleet's replicas
        by the thousand per poll: a frozen ReplicaReport per replica was two thirds of a heartbeat's
        parse (``loadtests.fleet_scale``'s ``beat_us``)."""
        return (str(data["version"]), str(data["state"]), _num(data.get("in_flight"), int),
                _num(data.get("concurrency"), int, 1), _num(data.get("memory_mb"), int),
                _num(data.get("cpus"), float, 1.0), bool(data.get("gpu")))


@dataclasses.dataclass(frozen=True)
class HostCapacity:
    """What a proxy's host offers and the budgets its replica manager works within (0: not reported)."""

    max_replicas: int = 16
    replica_concurrency: int = 1
    cpus: float = 0.0
    load1: float = 0.0
    memory_mb: int = 0
    memory_available_mb: int = 0
    memory_budget_mb: int = 0
    max_replicas_per_customer: int = 0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "HostCapacity":
        return cls(**{name: _num(data.get(name), kind, default) for name, kind, default in _CAPACITY_FIELDS})


# Read once: every heartbeat of the fleet is parsed through HostCapacity.from_dict on every poll.
_CAPACITY_FIELDS = tuple((f.name, type(f.default), f.default) for f in dataclasses.fields(HostCapacity))


@dataclasses.dataclass(frozen=True)
class ProxyHeartbeat:
    """What a proxy publishes every few seconds under a TTL, and the one definition of its shape: built
    by runtime_proxy/heartbeat.py through this class, read by every ingress's view through it."""

    proxy_id: str
    url: str
    epoch: int
    ts: float
    runtime: str = ""
    started_at: float = 0.0
    capacity: HostCapacity = HostCapacity()
    replicas: tuple[ReplicaReport, ...] = ()
    waiting: dict[str, int] = dataclasses.field(default_factory=dict)  # chunks waiting for a slot, per version
    gpus: tuple[dict[str, Any], ...] = ()  # the GPU coordinator's view per GPU (runtime_proxy/gpu.py)
    nvml: str = ""  # "ok", or why this host shows no GPUs
    images: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], replicas: bool = True) -> "ProxyHeartbeat":
        """KeyError, TypeError or ValueError when malformed (a reader skips such a heartbeat).
        ``replicas`` False: the replicas are left out (a reader that wants only their routing fields
        takes them with ``ReplicaReport.routing_fields``)."""
        waiting = data.get("waiting")
        return cls(
            proxy_id=str(data["proxy_id"]), url=str(data["url"]), epoch=_num(data.get("epoch"), int),
            ts=_num(data.get("ts"), float), runtime=str(data.get("runtime") or ""),
            started_at=_num(data.get("started_at"), float),
            capacity=HostCapacity.from_dict(data.get("capacity") or {}),
            replicas=tuple(ReplicaReport.from_dict(r) for r in data.get("replicas") or ()) if replicas else (),
            waiting={str(k): int(v) for k, v in waiting.items() if v} if isinstance(waiting, dict) else {},
            gpus=tuple(g for g in data.get("gpus") or () if isinstance(g, dict)),
            nvml=str(data.get("nvml") or ""), images=tuple(str(i) for i in data.get("images") or ()),
        )


# The phases of a replica start a proxy times (``<phase>_ms`` in ChunkResult.timings).
START_PHASES = ("pull", "create", "start", "ready", "unpause")


def start_ms(timings: dict[str, float]) -> float:
    """The whole start of a chunk's replica: its phases summed (0 when it was warm)."""
    return sum(timings.get(f"{phase}_ms", 0.0) for phase in START_PHASES)


@dataclasses.dataclass
class ChunkResult:
    """What a proxy answers for a chunk (status 200 even when the model raised)."""

    outputs: list[Any] | None
    stdout: str = ""
    stderr: str = ""
    error: str | None = None
    traceback: str | None = None
    start: str = "warm"  # warm | lukewarm | cold: what the replica was when the chunk came
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    proxy_id: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ChunkResult":
        known = _CHUNK_RESULT_FIELDS
        return cls(**{k: v for k, v in data.items() if k in known})


# Read once: every chunk's answer is read through ChunkResult.from_dict.
_CHUNK_RESULT_FIELDS = frozenset(f.name for f in dataclasses.fields(ChunkResult))
