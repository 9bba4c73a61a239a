"""Who may see ``/status``: signed session tokens, sign-outs and the sign-in rate limit (ingress/status_page.py).

Sessions are expiring tokens signed with a key derived from the admin token, not ids kept in memory:
any ingress (or worker) accepts them, they outlive a restart, they need no Redis, and rotating the
admin token ends them all.
"""
from __future__ import annotations

import hashlib
import hmac
import re

SESSION_LIFETIME_S = 12 * 3600
SESSION_SHAPE = re.compile(r"[0-9]{1,12}\.[0-9a-f]{32}\.[0-9a-f]{64}")


def _session_key(admin_token: str) -> bytes:
    # Derived, with a purpose label: the cookie never holds the admin token, and a MAC made for a
    # session is good for nothing else.
    return hmac.new(admin_token.encode(), b"lukewarm/status-session/v1", hashlib.sha256).digest()


def _mac(admin_token: str, body: str) -> str:
    return hmac.new(_session_key(admin_token), body.encode(), hashlib.sha256).hexdigest()


def issue_session(admin_token: str, now: float, nonce: str, lifetime_s: float = SESSION_LIFETIME_S) -> str:
    """A session token ``<expires>.<nonce>.<mac>``; ``nonce`` (32 hex digits) names it for sign-out."""
    body = f"{int(now + lifetime_s)}.{nonce}"
    return f"{body}.{_mac(admin_token, body)}"


def read_session(admin_token: str, token: str, now: float) -> tuple[str, float] | None:
    """``(nonce, expires)`` of a token this admin token signed and that has not expired; else None."""
    # Shape first: a cookie is any bytes a client sent (non-UTF-8 ones arrive as surrogates).
    if not admin_token or not SESSION_SHAPE.fullmatch(token):
        return None
    expires, nonce, mac = token.split(".")
    if not hmac.compare_digest(mac.encode(), _mac(admin_token, f"{expires}.{nonce}").encode()):
        return None
    return (nonce, float(expires)) if now < int(expires) else None


class SignOuts:
    """Sessions signed out at this ingress, until they would have expired anyway; bounded (the oldest
    sign-out is forgotten first: its cookie is gone from the browser that asked)."""

    def __init__(self, max_entries: int = 10_000) -> None:
        self.max_entries = max_entries
        self._until: dict[str, float] = {}

    def revoke(self, nonce: str, expires: float, now: float) -> None:
        if len(self._until) >= self.max_entries:
            self._until = {n: t for n, t in self._until.items() if t > now}
        while len(self._until) >= self.max_entries:
            del self._until[next(iter(self._until))]
        self._until[nonce] = expires

    def revoked(self, nonce: str) -> bool:
        return nonce in self._until


class LoginLimiter:
    """Failed sign-ins per client address, in fixed windows: at most ``max_failures`` per ``window_s``.

    Bounded: past ``max_clients`` addresses with a live window, every further address shares one
    window (staff may then wait a minute; the bearer still works). Per address rather than one count
    for all, so that a guesser cannot lock staff out of the form during an incident; the admin token's
    length is the real defence, this only caps online guessing. Behind a load balancer every client
    has the balancer's address, and the limit is this ingress's as a whole.
    """

    OVERFLOW = "*"

    def __init__(self, max_failures: int = 10, window_s: float = 60.0, max_clients: int = 1024) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self.max_clients = max_clients
        self._windows: dict[str, tuple[float, int]] = {}

    def _slot(self, client: str, now: float) -> str:
        if client in self._windows or len(self._windows) < self.max_clients:
            return client
        self._windows = {c: w for c, w in self._windows.items() if now - w[0] < self.window_s}
        return client if len(self._windows) < self.max_clients else self.OVERFLOW

    def retry_after_s(self, client: str, now: float) -> float:
        """0 when ``client`` may try; else how long until it may."""
        start, count = self._windows.get(self._slot(client, now), (now, 0))
        left = self.window_s - (now - start)
        return left if count >= self.max_failures and left > 0 else 0.0

    def failed(self, client: str, now: float) -> None:
        slot = self._slot(client, now)
        start, count = self._windows.get(slot, (now, 0))
        if now - start >= self.window_s:
            start, count = now, 0
        self._windows[slot] = (start, count + 1)
