"""The proxy adapter: sends one chunk to one proxy over HTTP, bounded by the deadline."""
from __future__ import annotations

import asyncio

import aiohttp
import orjson

from shared.errors import ApiError
from shared.messages import ChunkRequest, ChunkResult

CHUNKS_PATH = "/internal/v1/chunks"
# The proxy answers its own 504 at the deadline; this grace lets that answer arrive.
ANSWER_GRACE_S = 2.0


class ProxyUnreachable(Exception):
    """The chunk never got an answer from this proxy: safe to retry on another."""


class ProxyClient:
    def __init__(self, session: aiohttp.ClientSession, secret: str, connect_timeout_s: float) -> None:
        self.session = session
        self.secret = secret
        self.connect_timeout_s = connect_timeout_s

    async def run(self, url: str, chunk: ChunkRequest) -> ChunkResult:
        """The proxy's result, or ApiError it answered; ProxyUnreachable when no answer came."""
        timeout = aiohttp.ClientTimeout(total=chunk.timeout_s + ANSWER_GRACE_S,
                                        sock_connect=self.connect_timeout_s)
        try:
            async with self.session.post(
                url + CHUNKS_PATH, data=orjson.dumps(chunk.to_dict()), timeout=timeout,
                headers={"Authorization": f"Bearer {self.secret}", "Content-Type": "application/json"},
            ) as resp:
                body = await resp.read()
                status = resp.status
                retry_after = resp.headers.get("Retry-After")
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            raise ProxyUnreachable(f"{url}: {type(exc).__name__}: {exc}") from None
        except asyncio.TimeoutError:
            raise ApiError(504, "timeout", "deadline passed before the model answered") from None
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise ProxyUnreachable(f"{url}: answered status {status} with no JSON") from None
        if status != 200:
            raise ApiError.from_body(status, data, {"Retry-After": retry_after} if retry_after else None)
        return ChunkResult.from_dict(data)
