"""The light HTTP/1.1 client against hostile answers: caps on head, body and framing."""
from __future__ import annotations

import asyncio

import pytest

from shared.http1 import MAX_HEAD_BYTES, BadResponse, Connection, ResponseTooLarge


class _Sink:
    """A writer that keeps what is sent (the request) and closes on demand."""

    def __init__(self) -> None:
        self.sent = b""
        self.closed = False

    def write(self, data: bytes) -> None:
        self.sent += data

    def close(self) -> None:
        self.closed = True


async def exchange(*answer: bytes, eof: bool = True, max_body: int = 1000) -> tuple[int, dict[bytes, bytes], bytes]:
    reader = asyncio.StreamReader()
    for part in answer:
        reader.feed_data(part)
    if eof:
        reader.feed_eof()
    conn = Connection(reader, _Sink(), max_body=max_body)  # type: ignore[arg-type]
    return await asyncio.wait_for(conn.exchange(b"GET / HTTP/1.1\r\n\r\n", b""), 5)


async def test_a_plain_answer() -> None:
    status, headers, body = await exchange(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: b\r\n\r\nok")
    assert (status, headers[b"x-a"], body) == (200, b"b", b"ok")


async def test_an_answer_in_single_bytes() -> None:
    raw = b"HTTP/1.1 201 Created\r\nContent-Length: 3\r\n\r\nabc"
    assert await exchange(*[raw[i:i + 1] for i in range(len(raw))]) == (201, {b"content-length": b"3"}, b"abc")


async def test_chunked_answers_are_read_within_the_cap() -> None:
    status, _, body = await exchange(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
    assert (status, body) == (200, b"abc")


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 10000000000\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1001\r\n\r\n" + b"x" * 1001,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + (b"100\r\n" + b"x" * 256 + b"\r\n") * 5,
    ],
)
async def test_over_the_body_cap(answer: bytes) -> None:
    """Refused as soon as the cap is passed: no waiting for (or buffering of) the rest."""
    with pytest.raises(ResponseTooLarge):
        await exchange(answer, eof=False)


@pytest.mark.parametrize(
    "answer",
    [
        b"\x00\xff garbage \r\n\r\n",
        b"HTTP/1.1 abc OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab",  # closed mid-body
        b"HTTP/1.1 200 OK\r\nX: " + b"a" * (MAX_HEAD_BYTES + 10),  # a header that never ends
        b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(200)) + b"\r\n",
        b"HTTP/1.1 101 Switching\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n",
    ],
)
async def test_malformed_answers(answer: bytes) -> None:
    with pytest.raises(BadResponse):
        await exchange(answer)


async def test_closed_before_answering_is_a_reset() -> None:
    with pytest.raises(ConnectionResetError):
        await exchange()


@pytest.mark.parametrize(
    ("answer", "reusable"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", True),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok", False),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", False),
    ],
)
async def test_keep_alive_follows_the_answer(answer: bytes, reusable: bool) -> None:
    """A pooled connection is what makes the hop cheap: reused unless the peer says otherwise."""
    reader = asyncio.StreamReader()
    reader.feed_data(answer)
    conn = Connection(reader, _Sink(), max_body=10)  # type: ignore[arg-type]
    await conn.exchange(b"", b"")
    assert conn.reusable is reusable


async def test_extra_bytes_after_the_answer_make_the_connection_unusable() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\nHTTP/1.1 200 OK\r\n")
    conn = Connection(reader, _Sink(), max_body=10)  # type: ignore[arg-type]
    await conn.exchange(b"", b"")
    assert conn.reusable is False
