"""Which customer a request is for: the first label of the Host below the base domain."""
from __future__ import annotations


def customer_from_host(host: str | None, base_domain: str) -> str | None:
    """``acme.app.example.com`` under ``app.example.com`` → ``acme``; None when no customer label.

    A ``:port`` is ignored, as is case and a trailing dot.
    """
    if not host:
        return None
    name = host.strip().lower()
    if name.startswith("["):
        return None  # an IPv6 literal names no customer
    name = (name.rsplit(":", 1)[0] if ":" in name else name).rstrip(".")
    base = base_domain.strip().lower().strip(".")
    suffix = "." + base
    if not name.endswith(suffix):
        return None
    label = name[: -len(suffix)]
    if not label:
        return None
    return label.split(".")[-1] if "." in label else label
