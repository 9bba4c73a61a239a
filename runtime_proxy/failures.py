"""What callers are told when a replica cannot start or dies, and the backoff of versions that keep failing.

Engine text (host paths, runtime internals) goes to the log; callers get one line.
"""
from __future__ import annotations

import dataclasses
import logging

from runtime_proxy import policy
from runtime_proxy.runtime import ExitInfo, RuntimeFailure
from shared.errors import ApiError, ReplicaFailed
from shared.messages import VersionSpec

log = logging.getLogger("lukewarm.proxy")

RUNTIME_MESSAGES = {
    "image_unavailable": "the model's image {image} is not available on this host",
    "replica_gone": "the replica disappeared while it was being started",
    "image_build_failed": "the model's image could not be built",
}


def runtime_error(exc: RuntimeFailure, subject: VersionSpec | str) -> ReplicaFailed:
    """The caller's one line for an engine failure about a version (or an image); the detail is logged."""
    image = subject.image if isinstance(subject, VersionSpec) else subject
    log.warning("runtime failure for %s: %s: %s", subject.key if isinstance(subject, VersionSpec) else image,
                exc.type, exc)
    message = RUNTIME_MESSAGES.get(exc.type, "the container engine could not run this replica")
    return ReplicaFailed(message.format(image=image), exc.type)


def exit_error(info: ExitInfo, when: str) -> ReplicaFailed:
    """Why a replica is gone, for its callers: out of memory, or exited (with its code)."""
    if info.oom_killed:
        return ReplicaFailed(f"the model ran out of memory {when} (killed by the OOM killer)", "oom")
    code = "" if info.exit_code is None else f" with code {info.exit_code}"
    if info.detail:
        log.warning("replica exited%s %s: %s", code, when, info.detail)  # engine text: host paths stay here
    return ReplicaFailed(f"the replica exited{code} {when}")


@dataclasses.dataclass
class _Failure:
    count: int
    until: float
    error: ApiError
    spec: VersionSpec


class StartBackoff:
    """Versions whose replicas failed to start, not started again until their backoff passes."""

    def __init__(self, base_s: float) -> None:
        self.base_s = base_s
        self._failures: dict[str, _Failure] = {}

    def record(self, spec: VersionSpec, error: ApiError, now: float) -> None:
        count = self._failures[spec.key].count + 1 if spec.key in self._failures else 1
        self._failures[spec.key] = _Failure(count=count, until=now + policy.backoff_s(count, self.base_s),
                                            error=error, spec=spec)

    def clear(self, key: str) -> None:
        self._failures.pop(key, None)

    def forget_other_code(self, spec: VersionSpec, same: bool) -> None:
        """A reused version number names other code: its predecessor's failures are not its own."""
        failure = self._failures.get(spec.key)
        if failure is not None and not same:
            del self._failures[spec.key]

    def spec_of(self, key: str) -> VersionSpec | None:
        failure = self._failures.get(key)
        return None if failure is None else failure.spec

    def refusal(self, key: str, now: float) -> ReplicaFailed | None:
        """The error to answer instead of starting, while the version is backing off; None otherwise."""
        failure = self._failures.get(key)
        if failure is None or now >= failure.until:
            return None
        wait_s = failure.until - now
        return ReplicaFailed(f"{failure.error.message} (not retried for {wait_s:.0f} s)", failure.error.type,
                             retry_after_s=wait_s)
