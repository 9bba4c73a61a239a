"""The proxy hop's request signatures: forged, stale, tampered or replayed requests are refused."""
from __future__ import annotations

import pytest

from shared.signing import NONCE, SIGNATURE, TIMESTAMP, BadSignature, ReplayGuard, derive_key, sign

KEY = derive_key("s3cret")
NOW = 1_800_000_000.0


def test_a_signed_request_passes_once() -> None:
    guard = ReplayGuard()
    headers = sign(KEY, "POST", "/internal/v1/chunks", b"{}", NOW)
    guard.check(KEY, "POST", "/internal/v1/chunks", b"{}", headers, NOW + 1)
    with pytest.raises(BadSignature, match="replay"):
        guard.check(KEY, "POST", "/internal/v1/chunks", b"{}", headers, NOW + 2)


@pytest.mark.parametrize(
    ("method", "path", "body", "key"),
    [
        ("GET", "/internal/v1/chunks", b"{}", KEY),
        ("POST", "/internal/v1/warm", b"{}", KEY),
        ("POST", "/internal/v1/chunks", b'{"inputs":[1]}', KEY),
        ("POST", "/internal/v1/chunks", b"{}", derive_key("other")),
    ],
)
def test_anything_changed_breaks_the_signature(method: str, path: str, body: bytes, key: bytes) -> None:
    headers = sign(KEY, "POST", "/internal/v1/chunks", b"{}", NOW)
    with pytest.raises(BadSignature, match="wrong"):
        ReplayGuard().check(key, method, path, body, headers, NOW)


@pytest.mark.parametrize("skew_s", [31.0, -31.0, float("nan")])
def test_outside_the_window_is_refused(skew_s: float) -> None:
    headers = sign(KEY, "POST", "/p", b"", NOW + skew_s)
    with pytest.raises(BadSignature):
        ReplayGuard().check(KEY, "POST", "/p", b"", headers, NOW)


@pytest.mark.parametrize(
    "change",
    [{TIMESTAMP: None}, {NONCE: None}, {SIGNATURE: None}, {SIGNATURE: "ab"}, {TIMESTAMP: "soon"},
     {NONCE: "x" * 65}, {TIMESTAMP: "1" * 40}],
)
def test_missing_or_malformed_headers_are_refused(change: dict[str, str | None]) -> None:
    headers = sign(KEY, "POST", "/p", b"", NOW)
    for name, value in change.items():
        if value is None:
            del headers[name]
        else:
            headers[name] = value
    with pytest.raises(BadSignature):
        ReplayGuard().check(KEY, "POST", "/p", b"", headers, NOW)


def test_the_secret_itself_is_not_the_key() -> None:
    """A bearer token equal to the secret (the old scheme) signs nothing."""
    forged = sign(b"s3cret", "POST", "/p", b"", NOW)
    with pytest.raises(BadSignature, match="wrong"):
        ReplayGuard().check(KEY, "POST", "/p", b"", forged, NOW)


def test_memory_is_bounded_and_forgotten_nonces_cannot_be_replayed() -> None:
    guard = ReplayGuard(max_nonces=3)
    sent = [sign(KEY, "POST", "/p", b"", NOW + i) for i in range(5)]
    for i, headers in enumerate(sent):
        guard.check(KEY, "POST", "/p", b"", headers, NOW + i)
    assert len(guard._seen) <= 4
    with pytest.raises(BadSignature, match="replay"):
        guard.check(KEY, "POST", "/p", b"", sent[0], NOW + 5)  # forgotten, but older than the floor


def test_nonces_expire_with_the_window() -> None:
    guard = ReplayGuard(window_s=30)
    guard.check(KEY, "POST", "/p", b"", sign(KEY, "POST", "/p", b"", NOW), NOW)
    guard.check(KEY, "POST", "/p", b"", sign(KEY, "POST", "/p", b"", NOW + 40), NOW + 40)
    assert len(guard._seen) == 1
