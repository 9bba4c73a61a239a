"""The container socket adapter: a small HTTP/1.1 client over a Unix socket.

An aiohttp ClientSession costs ~200 µs of CPU per request; this keeps a few
persistent connections per replica with the lightest framing the harness
speaks (Content-Length only), which is most of the proxy's own overhead.
"""
from __future__ import annotations

import asyncio
from typing import Any

import orjson

from shared.http1 import Connection, request_head


class HarnessUnavailable(ConnectionError):
    """The replica's socket refused, reset or closed: the process is gone or not up."""


class HarnessClient:
    """Talks to one replica's harness. Safe for concurrent use: one connection per call in flight."""

    def __init__(self, socket_path: str, max_idle: int = 4) -> None:
        self.socket_path = socket_path
        self._idle: list[Connection] = []
        self._max_idle = max_idle

    async def _connect(self) -> Connection:
        try:
            reader, writer = await asyncio.open_unix_connection(self.socket_path, limit=2**26)
        except (FileNotFoundError, ConnectionRefusedError, ConnectionResetError) as exc:
            raise HarnessUnavailable(f"cannot connect to the replica: {exc.strerror or exc}") from exc
        return Connection(reader, writer)

    async def call(self, method: str, path: str, payload: Any = None) -> tuple[int, Any]:
        """One request; the caller bounds it with a timeout (a stuck model never answers)."""
        body = b"" if payload is None else orjson.dumps(payload)
        conn = self._idle.pop() if self._idle else await self._connect()
        try:
            status, headers, data = await conn.exchange(request_head(method, path, "harness", len(body)), body)
        except (ConnectionError, asyncio.IncompleteReadError, OSError, ValueError, IndexError) as exc:
            conn.close()
            raise HarnessUnavailable(f"the replica connection broke: {exc}") from exc
        except BaseException:
            # Cancelled mid-request: the connection's framing is unknown now.
            conn.close()
            raise
        if Connection.keeps_alive(headers) and len(self._idle) < self._max_idle:
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
