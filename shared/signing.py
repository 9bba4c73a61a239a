"""Per-request authentication of the ingress → proxy hop: an HMAC a sniffer cannot replay.

Each request carries a timestamp, a random nonce and an HMAC-SHA256 over
method, path, timestamp, nonce and the body's SHA-256, keyed by a key derived
from ``LUKEWARM_PROXY_SECRET`` (the secret itself never travels). A proxy
accepts a signature only within ``WINDOW_S`` of its own clock and only once
(``ReplayGuard`` remembers the nonces of the window), so a captured request is
worthless a moment later and cannot be sent twice even within the window.
The hop is authenticated, not encrypted: keep proxies on a private network.
"""
from __future__ import annotations

import collections
import hashlib
import hmac
import secrets

WINDOW_S = 30.0
TIMESTAMP = "X-Lukewarm-Timestamp"
NONCE = "X-Lukewarm-Nonce"
SIGNATURE = "X-Lukewarm-Signature"
_KEY_LABEL = b"lukewarm proxy request v1"
_NONCE_BYTES = 16


class BadSignature(Exception):
    """The request is not from a holder of the secret, too old, or a replay."""


def derive_key(secret: str) -> bytes:
    """The signing key: what a leaked request log or core dump of a signature cannot give back."""
    return hmac.new(secret.encode(), _KEY_LABEL, hashlib.sha256).digest()


def _mac(key: bytes, method: str, path: str, timestamp: str, nonce: str, body: bytes) -> str:
    message = "\n".join((method.upper(), path, timestamp, nonce, hashlib.sha256(body).hexdigest())).encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def sign(key: bytes, method: str, path: str, body: bytes, now: float, nonce: str | None = None) -> dict[str, str]:
    """The headers that authenticate one request."""
    timestamp = f"{now:.3f}"
    nonce = nonce or secrets.token_hex(_NONCE_BYTES)
    return {TIMESTAMP: timestamp, NONCE: nonce, SIGNATURE: _mac(key, method, path, timestamp, nonce, body)}


def signed_head_lines(key: bytes, method: str, path: str, body: bytes, now: float) -> str:
    """``sign`` as raw HTTP/1.1 header lines, for the light client."""
    return "".join(f"{name}: {value}\r\n" for name, value in sign(key, method, path, body, now).items())


class ReplayGuard:
    """Nonces seen within the window; bounded by the window, not by trust in the sender.

    ``max_nonces`` caps memory even under a flood of valid signatures (only a
    holder of the secret can make those): past it the oldest are forgotten,
    and their timestamps are refused as too old from then on.
    """

    def __init__(self, window_s: float = WINDOW_S, max_nonces: int = 1_000_000) -> None:
        self.window_s = window_s
        self.max_nonces = max_nonces
        self._seen: dict[str, float] = {}
        self._order: collections.deque[tuple[float, str]] = collections.deque()
        self._floor = float("-inf")  # timestamps at or below this may have been forgotten

    def _expire(self, now: float) -> None:
        while self._order and (self._order[0][0] < now - self.window_s or len(self._order) > self.max_nonces):
            ts, nonce = self._order.popleft()
            self._seen.pop(nonce, None)
            if ts >= now - self.window_s:
                self._floor = max(self._floor, ts)

    def check(self, key: bytes, method: str, path: str, body: bytes, headers: dict[str, str], now: float) -> None:
        """Accept a request once; BadSignature otherwise. ``headers`` maps header names as sent."""
        timestamp, nonce, signature = headers.get(TIMESTAMP), headers.get(NONCE), headers.get(SIGNATURE)
        if not timestamp or not nonce or not signature:
            raise BadSignature("missing request signature")
        if len(nonce) > 64 or len(signature) != 64 or len(timestamp) > 32:
            raise BadSignature("malformed request signature")
        try:
            ts = float(timestamp)
        except ValueError:
            raise BadSignature("malformed request timestamp") from None
        if not abs(now - ts) <= self.window_s:  # also refuses NaN
            raise BadSignature("request timestamp outside the window (clocks apart, or a replay)")
        expected = _mac(key, method, path, timestamp, nonce, body)
        if not hmac.compare_digest(expected, signature):
            raise BadSignature("wrong request signature")
        self._expire(now)
        if nonce in self._seen or ts <= self._floor:
            raise BadSignature("request already seen (a replay)")
        self._seen[nonce] = ts
        self._order.append((ts, nonce))
