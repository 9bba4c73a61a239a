"""The ingress's proxy client against a stand-in proxy on a real socket: which connection each call uses."""
from __future__ import annotations

import asyncio
import itertools

import orjson

from ingress.proxy_client import ProxyClient
from shared.messages import ChunkRequest, VersionSpec

ANSWER = orjson.dumps({"outputs": [1], "start": "warm"})


async def test_chunk_calls_never_ride_a_connection_another_route_opened() -> None:
    """The proxy serves chunks on a lean server only on connections that carried nothing else: a warm
    call's connection, pooled and reused for chunks, would put every chunk through aiohttp for good."""
    seen: list[tuple[int, str]] = []
    ids = itertools.count()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = next(ids)
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length"))
            await reader.readexactly(length)
            seen.append((conn, head.split(b" ")[1].decode()))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(ANSWER), ANSWER))
            await writer.drain()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    client = ProxyClient("secret", connect_timeout_s=5)
    chunk = ChunkRequest(spec=VersionSpec("c", "m", "main", 1, "img"), inputs=[1], timeout_s=5, request_id="r")
    try:
        await asyncio.wait_for(client.warm(url, chunk), 5)
        for _ in range(3):
            await asyncio.wait_for(client.run(url, chunk), 5)
    finally:
        client.close()
        server.close()
    [warm_conn] = {c for c, path in seen if path.endswith("/warm")}
    chunk_conns = {c for c, path in seen if path.endswith("/chunks")}
    assert len(chunk_conns) == 1 and warm_conn not in chunk_conns, seen
