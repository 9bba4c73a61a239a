"""The Redis key schema: every key and channel Lukewarm uses, in one place.

Values are JSON (orjson) strings unless a function says otherwise. Liveness
is a key with a TTL; ownership is an increasing epoch (fencing token).
"""
from __future__ import annotations

import time

PREFIX = "lw"

# Published whenever a pointer, version, key or customer changes, so that
# every ingress refreshes its local view at once instead of on its next poll.
EVENTS_CHANNEL = f"{PREFIX}:events"

# Sorted set of proxy ids, scored by last heartbeat time (seconds).
PROXIES = f"{PREFIX}:proxies"

# Every customer name (a set).
CUSTOMERS = f"{PREFIX}:customers"


def customer(name: str) -> str:
    return f"{PREFIX}:customer:{name}"


def api_key(key_hash: str) -> str:
    """The record of one API key, addressed by the SHA-256 of the key."""
    return f"{PREFIX}:apikey:{key_hash}"


def customer_keys(name: str) -> str:
    """Hash: key id → key hash, for listing and deleting a customer's keys."""
    return f"{PREFIX}:customer:{name}:keys"


def branch_base(customer_name: str, model: str, branch: str) -> str:
    return f"{PREFIX}:m:{customer_name}:{model}:{branch}"


def version_counter(customer_name: str, model: str, branch: str) -> str:
    return branch_base(customer_name, model, branch) + ":counter"


def version(customer_name: str, model: str, branch: str, number: int) -> str:
    return branch_base(customer_name, model, branch) + f":v:{number}"


def versions_index(customer_name: str, model: str, branch: str) -> str:
    """Set of the version numbers that exist on a branch."""
    return branch_base(customer_name, model, branch) + ":versions"


def pointers(customer_name: str, model: str, branch: str) -> str:
    """Hash: pointer name (``latest`` or an alias) → version number."""
    return branch_base(customer_name, model, branch) + ":pointers"


def request_logs(customer_name: str, model: str, branch: str) -> str:
    """Capped list of recent request records, newest first."""
    return branch_base(customer_name, model, branch) + ":logs"


def branches_index() -> str:
    """Set of every ``customer/model/branch`` triple, for the local view."""
    return f"{PREFIX}:branches"


def proxy_heartbeat(proxy_id: str) -> str:
    return f"{PREFIX}:proxy:{proxy_id}"


def proxy_epoch(proxy_id: str) -> str:
    """Counter incremented at each proxy start: the proxy's fencing token."""
    return f"{PREFIX}:proxy:{proxy_id}:epoch"


# Hash: version key (``customer/model/branch/version``) → its capacity.min, for every version not
# retired whose capacity.min is above 0: the capacity loop finds what it must keep ready here,
# without a scan. (A hash, not a set: the ingress's Redis user reads hashes, deploy/redis-acl.conf.)
CAPACITY_FLOOR = f"{PREFIX}:capacity:floor"


def lease(name: str) -> str:
    """A lease: ``<epoch>:<holder>`` under a TTL, held by one process at a time (e.g. the reconciler's)."""
    return f"{PREFIX}:lease:{name}"


def lease_epoch(name: str) -> str:
    """Counter incremented at each acquisition of lease ``name``: its holders' fencing token."""
    return f"{PREFIX}:lease:{name}:epoch"


def usage(customer_name: str) -> str:
    """Hash of usage counters for a customer."""
    return f"{PREFIX}:usage:{customer_name}"


# ---- usage (hourly buckets) ------------------------------------------------------------
# Hash per customer and UTC hour; fields ``<model>/<branch>/<version>:<metric>`` (names hold
# no ``/`` or ``:`` and a branch no ``:``, so a field splits back unambiguously). Ingresses add
# ``requests`` and ``errors`` (HINCRBY), proxies ``replica_seconds`` and ``paused_seconds``
# (HINCRBYFLOAT); every write also sets the TTL, so a bucket lives USAGE_TTL_S past its last write.
USAGE_METRICS = ("requests", "errors", "replica_seconds", "paused_seconds")
USAGE_TTL_S = 400 * 86400
USAGE_BUCKET_S = 3600


def usage_hour(customer_name: str, hour: int) -> str:
    """The usage hash of ``customer_name`` for UTC hour ``hour`` (epoch seconds // 3600): ``…:YYYYMMDDHH``."""
    return f"{PREFIX}:usage:{customer_name}:{time.strftime('%Y%m%d%H', time.gmtime(hour * USAGE_BUCKET_S))}"


def usage_field(model: str, branch: str, version: int, metric: str) -> str:
    return f"{model}/{branch}/{version}:{metric}"
