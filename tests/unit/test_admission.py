"""Per-customer admission: one customer's flood leaves the others their turn."""
from __future__ import annotations

import pytest

from ingress.admission import CustomerLimiter
from shared.errors import ApiError


def test_past_the_limit_is_429_for_that_customer_only() -> None:
    limiter = CustomerLimiter(2)
    with limiter.admit("acme"), limiter.admit("acme"):
        with pytest.raises(ApiError) as info:
            with limiter.admit("acme"):
                pass
        assert (info.value.status, info.value.type, info.value.headers) == (429, "rate_limited", {"Retry-After": "1"})
        with limiter.admit("globex"):
            assert limiter.in_flight("globex") == 1
    assert limiter.in_flight("acme") == 0


def test_a_failing_request_gives_its_turn_back() -> None:
    limiter = CustomerLimiter(1)
    with pytest.raises(RuntimeError):
        with limiter.admit("acme"):
            raise RuntimeError("boom")
    with limiter.admit("acme"):
        pass
