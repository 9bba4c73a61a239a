"""The lightest HTTP/1.1 the project speaks to itself: one request out, one answer parsed, bounded.

Shared by the proxy's container-socket client and the ingress's proxy client.
What comes back is parsed by httptools (uvicorn's parser, C) with caps on the
head, the header count and the body: a model container answers on that
socket, and its bytes are hostile — a 10 GB ``Content-Length``, endless
chunks, a header that never ends. The caller bounds the time.
"""
from __future__ import annotations

import asyncio

import httptools

MAX_HEAD_BYTES = 64 * 1024
MAX_HEADERS = 100
READ_BYTES = 256 * 1024


class BadResponse(ValueError):
    """The peer's answer is not well-formed HTTP/1.1 (or breaks a cap on its head)."""


class ResponseTooLarge(ValueError):
    """The peer's answer is larger than the caller accepts."""


class _Answer:
    """httptools callbacks: collect one response within the caps."""

    def __init__(self, max_body: int) -> None:
        self.max_body = max_body
        self.headers: dict[bytes, bytes] = {}
        self.head_bytes = 0
        self.body = bytearray()
        self.messages = 0
        self.head_done = False
        self.keep_alive = False
        self.complete = False
        self.parser: httptools.HttpResponseParser | None = None
        self.error: Exception | None = None

    def on_message_begin(self) -> None:
        self.messages += 1

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_bytes += len(name) + len(value)
        if self.head_bytes > MAX_HEAD_BYTES or len(self.headers) >= MAX_HEADERS:
            self.error = BadResponse(f"answer head over {MAX_HEAD_BYTES} bytes or {MAX_HEADERS} headers")
            raise self.error
        self.headers[name.lower()] = value

    def on_headers_complete(self) -> None:
        self.head_done = True
        # Only valid while the message is being parsed: after it completes httptools says False.
        self.keep_alive = self.parser is not None and self.parser.should_keep_alive()
        length = self.headers.get(b"content-length")
        if length is not None and length.strip().isascii() and length.strip().isdigit() and int(length) > self.max_body:
            self.error = ResponseTooLarge(f"answer announces {int(length)} bytes, over the limit of {self.max_body}")
            raise self.error

    def on_body(self, data: bytes) -> None:
        if len(self.body) + len(data) > self.max_body:
            self.error = ResponseTooLarge(f"answer over the limit of {self.max_body} bytes")
            raise self.error
        self.body += data

    def on_message_complete(self) -> None:
        self.complete = True


class Connection:
    """One keep-alive connection; a caller uses it for one exchange at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 max_body: int = 64 * 2**20) -> None:
        self.reader = reader
        self.writer = writer
        self.max_body = max_body
        self.reusable = True

    async def exchange(self, head: bytes, body: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
        """Send a request; (status, lower-cased headers, body).

        ConnectionResetError if the peer closed before answering; BadResponse or
        ResponseTooLarge for an answer that is malformed or over the caps
        (the connection is then not reusable).
        """
        self.writer.write(head + body)
        answer = _Answer(self.max_body)
        parser = answer.parser = httptools.HttpResponseParser(answer)
        received = 0
        while not answer.complete:
            if received > MAX_HEAD_BYTES and not answer.head_done:
                # The parser buffers a header line until it ends: one that never does is refused here.
                raise BadResponse(f"no complete answer head in the first {MAX_HEAD_BYTES} bytes")
            data = await self.reader.read(READ_BYTES)
            if not data:
                if received == 0:
                    raise ConnectionResetError("closed before answering")
                raise BadResponse("the peer closed the connection mid-answer")
            received += len(data)
            try:
                parser.feed_data(data)
            except httptools.HttpParserUpgrade:
                raise BadResponse("the peer asked to switch protocols") from None
            except httptools.HttpParserError as exc:
                if answer.error is not None:
                    raise answer.error from None
                raise BadResponse(f"malformed answer: {exc}") from None
        # A second message in the same read is bytes nobody asked for: do not trust the stream again.
        self.reusable = answer.messages == 1 and answer.keep_alive
        return parser.get_status_code(), answer.headers, bytes(answer.body)

    def close(self) -> None:
        self.writer.close()


def request_head(method: str, path: str, host: str, length: int, extra: str = "") -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n{extra}"
            f"Content-Length: {length}\r\n\r\n").encode()
