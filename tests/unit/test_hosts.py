"""customer_from_host: the customer is the label just below the base domain."""
from __future__ import annotations

import pytest

from ingress.hosts import customer_from_host


@pytest.mark.parametrize(
    ("host", "base", "expected"),
    [
        ("acme.localhost", "localhost", "acme"),
        ("acme.localhost:8080", "localhost", "acme"),
        ("ACME.LocalHost.", "localhost", "acme"),
        ("  acme.localhost  ", "localhost", "acme"),
        ("acme.localhost", "LocalHost.", "acme"),
        ("acme.app.example.com", "app.example.com", "acme"),
        ("acme.app.example.com:443", "app.example.com", "acme"),
        ("a.b.localhost", "localhost", "b"),  # the label directly below the base domain
        ("localhost", "localhost", None),
        ("localhost:8080", "localhost", None),
        (".localhost", "localhost", None),
        ("evil.com", "localhost", None),
        ("acme.evillocalhost", "localhost", None),
        ("evilapp.example.com", "app.example.com", None),
        ("acme.example.com", "app.example.com", None),
        ("app.example.com", "app.example.com", None),
        ("[::1]:80", "localhost", None),
        ("[::1]", "localhost", None),
        ("127.0.0.1:8080", "localhost", None),
        ("", "localhost", None),
        (None, "localhost", None),
    ],
)
def test_customer_from_host(host: str | None, base: str, expected: str | None) -> None:
    assert customer_from_host(host, base) == expected


def test_trailing_dot_with_port() -> None:
    assert customer_from_host("acme.localhost.:8080", "localhost") == "acme"
