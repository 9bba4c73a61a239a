"""The proxy adapter: sends one chunk to one proxy, bounded by the deadline.

A small HTTP/1.1 client over persistent TCP connections, Content-Length
framing only (all the proxy speaks). An aiohttp ClientSession request costs
~200 µs of CPU; this is most of the difference on a warm call (PERFORMANCE.md).
"""
from __future__ import annotations

import asyncio
import time
import urllib.parse
from typing import Any

import orjson

from shared.errors import ApiError, DeadlinePassed, ReplicaFailed
from shared.http1 import Connection, ResponseTooLarge, request_head
from shared.messages import ChunkRequest, ChunkResult
from shared.signing import derive_key, signed_head_lines

CHUNKS_PATH = "/internal/v1/chunks"
WARM_PATH = "/internal/v1/warm"
RESOLVE_PATH = "/internal/v1/images/resolve"
# The proxy answers its own 504 at the deadline; this grace lets that answer arrive.
ANSWER_GRACE_S = 2.0
MAX_IDLE_PER_PROXY = 64


class ProxyUnreachable(Exception):
    """The chunk never got an answer from this proxy. ``reached`` False: it never got there either (the
    connection was refused or timed out), so it is safe to send again, even to the same proxy later."""

    def __init__(self, message: str, reached: bool = True) -> None:
        super().__init__(message)
        self.reached = reached


class _StaleConnection(Exception):
    """A pooled connection the proxy had already closed: retry on a fresh one."""


class ProxyClient:
    """Keeps idle connections per proxy; safe for concurrent use (one connection per call in flight)."""

    def __init__(self, secret: str, connect_timeout_s: float, max_answer_bytes: int = 129 * 2**20) -> None:
        self._key = derive_key(secret)
        self.max_answer_bytes = max_answer_bytes
        self.connect_timeout_s = connect_timeout_s
        # Per proxy and path: the proxy serves its chunk route on a lean server that keeps a connection
        # only while every request on it is a chunk (one that began with another route is aiohttp's for
        # good), so chunk calls never reuse a connection another route opened.
        self._idle: dict[tuple[str, str], list[Connection]] = {}
        self._addresses: dict[str, tuple[str, int]] = {}

    def _address(self, url: str) -> tuple[str, int]:
        address = self._addresses.get(url)
        if address is None:
            parts = urllib.parse.urlsplit(url)
            address = (parts.hostname or "127.0.0.1", parts.port or 80)
            self._addresses[url] = address
        return address

    async def _connect(self, url: str) -> Connection:
        host, port = self._address(url)
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, limit=2**16), self.connect_timeout_s)
        except (OSError, TimeoutError) as exc:
            raise ProxyUnreachable(f"{url}: cannot connect: {exc or type(exc).__name__}", reached=False) from None
        return Connection(reader, writer, max_body=self.max_answer_bytes)

    async def run(self, url: str, chunk: ChunkRequest) -> ChunkResult:
        """The proxy's result, or ApiError it answered; ProxyUnreachable when no answer came."""
        return ChunkResult.from_dict(await self._post(url, CHUNKS_PATH, chunk.to_dict(), chunk.timeout_s))

    async def warm(self, url: str, chunk: ChunkRequest, replicas: int = 1) -> dict[str, Any]:
        """Have the proxy run ``replicas`` ready replicas of ``chunk.spec`` (its inputs are ignored):
        paused or stopped ones there are woken first, new ones started for the rest."""
        return dict(await self._post(url, WARM_PATH, {**chunk.to_dict(), "replicas": replicas}, chunk.timeout_s))

    async def resolve_image(self, url: str, image: str, timeout_s: float) -> str:
        """The content id of ``image`` on that proxy's host (pulled there when missing)."""
        answer = await self._post(url, RESOLVE_PATH, {"image": image}, timeout_s)
        return str(answer.get("image_id") or "") if isinstance(answer, dict) else ""

    async def _post(self, url: str, path: str, payload: dict[str, Any], timeout_s: float) -> Any:
        body = orjson.dumps(payload)
        host = url.split("//", 1)[-1]

        def head() -> bytes:  # signed afresh per attempt: a nonce is good once
            return request_head("POST", path, host, len(body), signed_head_lines(self._key, "POST", path, body,
                                                                                 time.time()))

        try:
            async with asyncio.timeout(timeout_s + ANSWER_GRACE_S):
                try:
                    status, headers, data = await self._exchange(url, path, head(), body, reuse=True)
                except _StaleConnection:
                    status, headers, data = await self._exchange(url, path, head(), body, reuse=False)
        except TimeoutError:
            raise DeadlinePassed("deadline passed before the model answered") from None
        try:
            answer = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise ProxyUnreachable(f"{url}: answered status {status} with no JSON") from None
        if status == 503 and isinstance(answer, dict) and answer.get("type") == "draining":
            raise ProxyUnreachable(f"{url}: stopping", reached=False)  # it ran nothing: another proxy may
        if status != 200:
            retry_after = headers.get(b"retry-after")
            raise ApiError.from_body(status, answer, {"Retry-After": retry_after.decode()} if retry_after else None)
        return answer

    async def _exchange(self, url: str, path: str, head: bytes, body: bytes,
                        reuse: bool) -> tuple[int, dict[bytes, bytes], bytes]:
        idle = self._idle.setdefault((url, path), [])
        pooled = reuse and bool(idle)
        conn = idle.pop() if pooled else await self._connect(url)
        try:
            status, headers, data = await conn.exchange(head, body)
        except ResponseTooLarge:
            conn.close()
            raise ReplicaFailed("the model's answer is larger than this ingress accepts", "response_too_large") \
                from None
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as exc:
            conn.close()
            if pooled and isinstance(exc, ConnectionResetError | BrokenPipeError):
                raise _StaleConnection() from None
            raise ProxyUnreachable(f"{url}: {type(exc).__name__}: {exc}") from None
        except BaseException:
            conn.close()  # cancelled mid-exchange: the framing is unknown now
            raise
        if conn.reusable and len(idle) < MAX_IDLE_PER_PROXY:
            idle.append(conn)
        else:
            conn.close()
        return status, headers, data

    def close(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()
