"""The container socket adapter: a small HTTP/1.1 client over a Unix socket.

An aiohttp ClientSession costs ~200 µs of CPU per request; this keeps a few
persistent connections per replica with the lightest framing the harness
speaks (Content-Length only), which is most of the proxy's own overhead.
"""
from __future__ import annotations

import asyncio
from typing import Any

import orjson


class HarnessUnavailable(ConnectionError):
    """The replica's socket refused, reset or closed: the process is gone or not up."""


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def request(self, method: str, path: str, body: bytes) -> tuple[int, bytes, bool]:
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: harness\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        self.writer.write(head + body)
        status_line = await self.reader.readline()
        if not status_line:
            raise HarnessUnavailable("the replica closed the connection without answering")
        status = int(status_line.split(b" ", 2)[1])
        length = 0
        keep_alive = True
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and value.strip().lower() == b"close":
                keep_alive = False
        data = await self.reader.readexactly(length) if length else b""
        return status, data, keep_alive

    def close(self) -> None:
        self.writer.close()


class HarnessClient:
    """Talks to one replica's harness. Safe for concurrent use: one connection per call in flight."""

    def __init__(self, socket_path: str, max_idle: int = 4) -> None:
        self.socket_path = socket_path
        self._idle: list[_Connection] = []
        self._max_idle = max_idle

    async def _connect(self) -> _Connection:
        try:
            reader, writer = await asyncio.open_unix_connection(self.socket_path, limit=2**26)
        except (FileNotFoundError, ConnectionRefusedError, ConnectionResetError) as exc:
            raise HarnessUnavailable(f"cannot connect to the replica: {exc.strerror or exc}") from exc
        return _Connection(reader, writer)

    async def call(self, method: str, path: str, payload: Any = None) -> tuple[int, Any]:
        """One request; the caller bounds it with a timeout (a stuck model never answers)."""
        body = b"" if payload is None else orjson.dumps(payload)
        conn = self._idle.pop() if self._idle else await self._connect()
        try:
            status, data, keep_alive = await conn.request(method, path, body)
        except (ConnectionError, asyncio.IncompleteReadError, OSError, ValueError, IndexError) as exc:
            conn.close()
            raise HarnessUnavailable(f"the replica connection broke: {exc}") from exc
        except BaseException:
            # Cancelled mid-request: the connection's framing is unknown now.
            conn.close()
            raise
        if keep_alive and len(self._idle) < self._max_idle:
            self._idle.append(conn)
        else:
            conn.close()
        try:
            return status, orjson.loads(data) if data else None
        except orjson.JSONDecodeError as exc:
            raise HarnessUnavailable(f"the replica answered malformed JSON: {exc}") from exc

    def close(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()
