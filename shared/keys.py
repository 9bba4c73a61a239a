"""The Redis key schema: every key and channel Lukewarm uses, in one place.

Values are JSON (orjson) strings unless a function says otherwise. Liveness
is a key with a TTL; ownership is an increasing epoch (fencing token).
"""
from __future__ import annotations

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


def usage(customer_name: str) -> str:
    """Hash of usage counters for a customer."""
    return f"{PREFIX}:usage:{customer_name}"
