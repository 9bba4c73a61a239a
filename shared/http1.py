"""The lightest HTTP/1.1 the project speaks to itself: one request, one Content-Length answer.

Shared by the proxy's container-socket client and the ingress's proxy client;
both keep connections alive and need no chunked encoding.
"""
from __future__ import annotations

import asyncio


class Connection:
    """One keep-alive connection; a caller uses it for one exchange at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def exchange(self, head: bytes, body: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
        """Send a request; (status, lower-cased headers, body). ConnectionResetError if the peer
        closed before answering; IncompleteReadError/ValueError on a broken answer."""
        self.writer.write(head + body)
        status_line = await self.reader.readline()
        if not status_line:
            raise ConnectionResetError("closed before answering")
        status = int(status_line.split(b" ", 2)[1])
        headers: dict[bytes, bytes] = {}
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get(b"content-length", b"0"))
        data = await self.reader.readexactly(length) if length else b""
        return status, headers, data

    @staticmethod
    def keeps_alive(headers: dict[bytes, bytes]) -> bool:
        return headers.get(b"connection", b"").lower() != b"close"

    def close(self) -> None:
        self.writer.close()


def request_head(method: str, path: str, host: str, length: int, extra: str = "") -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n{extra}"
            f"Content-Length: {length}\r\n\r\n").encode()
