"""ApiError: the one error shape, with a one-line message."""
from __future__ import annotations

import orjson
import pytest

from shared.errors import ApiError, bad_request, deadline_exceeded, first_line, not_found, unavailable


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("ValueError: bad input", "ValueError: bad input"),
        ("ValueError: bad input\nTraceback (most recent call last):\n  File x", "ValueError: bad input"),
        ("\n\n  first real line\nsecond", "first real line"),
        ("", "error"),
        ("   \n\t ", "error"),
        ("x" * 600, "x" * 500),
    ],
)
def test_first_line(message: str, expected: str) -> None:
    assert first_line(message) == expected


def test_first_line_custom_limit() -> None:
    assert first_line("abcdef", limit=3) == "abc"


def test_api_error_body_is_one_line_but_str_keeps_all() -> None:
    exc = ApiError(422, "model_error", "ValueError: bad\nTraceback ...")
    assert exc.message == "ValueError: bad"
    assert exc.body() == {"error": "ValueError: bad", "type": "model_error"}
    assert orjson.loads(exc.json_bytes()) == exc.body()
    assert exc.headers == {}


@pytest.mark.parametrize(
    ("make", "status", "type_"),
    [
        (lambda: bad_request("x"), 400, "bad_request"),
        (lambda: not_found("x"), 404, "not_found"),
        (lambda: unavailable("x"), 503, "unavailable"),
        (lambda: deadline_exceeded(), 504, "timeout"),
    ],
)
def test_helpers(make, status: int, type_: str) -> None:
    exc = make()
    assert (exc.status, exc.type) == (status, type_)


@pytest.mark.parametrize(("retry", "header"), [(1, "1"), (5, "5"), (0, "1"), (-3, "1"), (2.9, "2")])
def test_unavailable_retry_after(retry: float, header: str) -> None:
    assert unavailable("busy", retry).headers == {"Retry-After": header}


@pytest.mark.parametrize(
    ("body", "type_", "message"),
    [
        ({"error": "no model", "type": "not_found"}, "not_found", "no model"),
        ({"error": "boom\nmore"}, "error", "boom"),
        ({"error": 5}, "bad_gateway", "unexpected answer with status 500"),
        ("plain text", "bad_gateway", "unexpected answer with status 500"),
        (None, "bad_gateway", "unexpected answer with status 500"),
    ],
)
def test_from_body(body: object, type_: str, message: str) -> None:
    exc = ApiError.from_body(500, body, {"Retry-After": "3"})
    assert (exc.status, exc.type, exc.message, exc.headers) == (500, type_, message, {"Retry-After": "3"})


def test_domain_errors_get_their_status_from_the_one_table() -> None:
    from runtime_proxy.gpu import GpuBusy
    from shared.errors import STATUS_OF, DomainError, NoCapacity, ReplicaFailed

    assert all(issubclass(kind, DomainError) for kind in STATUS_OF)
    for kind, status in STATUS_OF.items():
        error = kind("x")
        assert (error.status, error.type, error.body()) == (status, kind.kind, {"error": "x", "type": kind.kind})
    busy = GpuBusy(2.5)  # a subclass answers as its kind
    assert (busy.status, busy.type, busy.headers) == (STATUS_OF[NoCapacity], "gpu_busy", {"Retry-After": "3"})
    assert ReplicaFailed("gone", "oom").json_bytes() == b'{"error":"gone","type":"oom"}'
