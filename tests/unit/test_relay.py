"""loadtests.relay: the bare byte-copying hop the overhead benchmark measures as a floor."""
from __future__ import annotations

import asyncio
from pathlib import Path

from loadtests.relay import serve


async def test_bytes_cross_two_relays_both_ways_and_a_close_reaches_the_far_end(tmp_path: Path) -> None:
    closed = asyncio.Event()

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data.upper())
            await writer.drain()
        closed.set()
        writer.close()

    origin = str(tmp_path / "origin.sock")
    server = await asyncio.start_unix_server(echo, origin)
    hop2, hop1 = str(tmp_path / "hop2.sock"), str(tmp_path / "hop1.sock")
    relays = [asyncio.create_task(serve(hop2, origin))]
    await asyncio.wait_for(_exists(hop2), 5)
    relays.append(asyncio.create_task(serve(hop1, hop2)))
    await asyncio.wait_for(_exists(hop1), 5)
    try:
        reader, writer = await asyncio.open_unix_connection(hop1)
        writer.write(b"hello")  # may arrive before a relay's upstream connection is made: kept, not lost
        assert await asyncio.wait_for(reader.readexactly(5), 5) == b"HELLO"
        big = b"x" * (1 << 20)
        writer.write(big)
        assert await asyncio.wait_for(reader.readexactly(len(big)), 10) == big.upper()
        writer.close()
        await asyncio.wait_for(closed.wait(), 5)
    finally:
        for task in relays:
            task.cancel()
        await asyncio.gather(*relays, return_exceptions=True)
        server.close()


async def _exists(path: str) -> None:
    while not Path(path).exists():
        await asyncio.sleep(0.01)
