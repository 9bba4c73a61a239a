"""Per-customer admission at one ingress: one customer's flood cannot take every other customer's turn."""
from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterator

from shared.errors import RateLimited


class CustomerLimiter:
    """At most ``limit`` requests of one customer in flight here; past it 429 + ``Retry-After``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._in_flight: collections.Counter[str] = collections.Counter()

    def in_flight(self, customer: str) -> int:
        return self._in_flight[customer]

    @contextlib.contextmanager
    def admit(self, customer: str) -> Iterator[None]:
        if self._in_flight[customer] >= self.limit:
            raise RateLimited(f"customer {customer!r} has {self.limit} requests in flight at this ingress",
                              retry_after_s=1)
        self._in_flight[customer] += 1
        try:
            yield
        finally:
            self._in_flight[customer] -= 1
            if not self._in_flight[customer]:
                del self._in_flight[customer]
