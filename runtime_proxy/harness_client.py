"""The container socket adapter: a small HTTP/1.1 client over a Unix socket, for a hostile peer.

An aiohttp ClientSession costs ~200 µs of CPU per request; this keeps a few
persistent connections per replica with the lightest framing. What answers on
the socket is customer code (the harness runs inside the customer's
container, and an image may serve the contract itself), so:

- the socket path must be a socket, not a symlink the model planted (the proxy
  runs as root on the host: a symlink could lead it to Docker's socket or
  another tenant's replica);
- the process that listens on it must belong to this replica (``peer_ok``,
  checked with ``SO_PEERCRED`` on every new connection: that defeats a swap
  between the check of the path and the connect);
- answers are parsed by a real HTTP parser with caps (``shared.http1``).
"""
from __future__ import annotations

import asyncio
import os
import socket
import stat
import struct
from collections.abc import Callable
from typing import Any

import orjson

from shared.http1 import BadResponse, Connection, ResponseTooLarge, request_head

_PEERCRED = struct.Struct("3i")  # pid, uid, gid


class HarnessUnavailable(ConnectionError):
    """The replica's socket refused, reset or closed: the process is gone or not up."""


class HarnessMisbehaved(Exception):
    """The replica answered something no honest harness sends; ``type`` is the error type for the caller."""

    def __init__(self, type_: str, message: str) -> None:
        super().__init__(message)
        self.type = type_


def peer_pid(sock: socket.socket) -> int:
    pid, _, _ = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    return int(pid)


class HarnessClient:
    """Talks to one replica's harness. Safe for concurrent use: one connection per call in flight."""

    def __init__(self, socket_path: str, max_idle: int = 4, max_response_bytes: int = 64 * 2**20,
                 peer_ok: Callable[[int], bool] | None = None) -> None:
        self.socket_path = socket_path
        self.max_response_bytes = max_response_bytes
        self.peer_ok = peer_ok
        self._idle: list[Connection] = []
        self._max_idle = max_idle

    def _check_path(self) -> None:
        try:
            mode = os.lstat(self.socket_path).st_mode
        except FileNotFoundError as exc:
            raise HarnessUnavailable("the replica's socket is not there (yet)") from exc
        if not stat.S_ISSOCK(mode):
            raise HarnessMisbehaved("bad_model_response", "the replica's socket was replaced by something else")

    async def _connect(self) -> Connection:
        self._check_path()
        try:
            reader, writer = await asyncio.open_unix_connection(self.socket_path, limit=2**16)
        except (FileNotFoundError, ConnectionRefusedError, ConnectionResetError) as exc:
            raise HarnessUnavailable(f"cannot connect to the replica: {exc.strerror or exc}") from exc
        if self.peer_ok is not None:
            sock = writer.get_extra_info("socket")
            try:
                pid = peer_pid(sock)
            except OSError:
                pid = 0
            if not pid or not self.peer_ok(pid):
                writer.close()
                raise HarnessMisbehaved("bad_model_response",
                                        "the process listening on the replica's socket is not the replica's")
        return Connection(reader, writer, max_body=self.max_response_bytes)

    async def call(self, method: str, path: str, payload: Any = None) -> tuple[int, Any]:
        """One request; the caller bounds it with a timeout (a stuck or dribbling model never answers).

        HarnessUnavailable when the replica is gone; HarnessMisbehaved for answers no harness sends.
        """
        body = b"" if payload is None else orjson.dumps(payload)
        conn = self._idle.pop() if self._idle else await self._connect()
        try:
            status, _, data = await conn.exchange(request_head(method, path, "harness", len(body)), body)
        except ResponseTooLarge as exc:
            conn.close()
            raise HarnessMisbehaved("response_too_large", f"the model's answer is too large: {exc}") from None
        except BadResponse as exc:
            conn.close()
            raise HarnessMisbehaved("bad_model_response", f"the model's socket answered malformed HTTP: {exc}") \
                from None
        except (ConnectionError, asyncio.IncompleteReadError, OSError) as exc:
            conn.close()
            raise HarnessUnavailable(f"the replica connection broke: {exc}") from exc
        except BaseException:
            # Cancelled mid-request: the connection's framing is unknown now.
            conn.close()
            raise
        if conn.reusable and len(self._idle) < self._max_idle:
            self._idle.append(conn)
        else:
            conn.close()
        try:
            return status, orjson.loads(data) if data else None
        except orjson.JSONDecodeError as exc:
            raise HarnessMisbehaved("bad_model_response", f"the model's socket answered malformed JSON: {exc}") \
                from None

    def close(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()
