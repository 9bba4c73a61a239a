"""A process that only copies bytes between Unix sockets: the floor under any design with a daemon in the path.

``python -m loadtests.relay LISTEN UPSTREAM`` accepts connections on the Unix socket ``LISTEN`` and joins
each to a new connection to ``UPSTREAM``, copying bytes both ways as they come: no parsing, no routing,
no checks, on uvloop when it is installed (as the daemons run). ``loadtests.overhead`` puts two in a chain
in front of a replica's socket, as ingress and proxy sit in front of it, and measures that path beside
the real one in the same rounds: what two process hops cost on this machine before any work is done.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast

from loadtests.common import REPO_ROOT, stop_process, track, wait_until
from shared.eventloop import install_uvloop

CONNECT_TIMEOUT_S = 5.0


class _Pipe(asyncio.Protocol):
    """One side of a joined pair: what arrives is written to the other side, which is paused and resumed
    with this side's buffer (a slow reader slows the writer instead of growing memory)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Pipe | None = None
        self.early: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is None or peer.transport is None:
            self.early.append(data)  # the upstream connection is still being made
        else:
            peer.transport.write(data)

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()


class _Downstream(_Pipe):
    def __init__(self, upstream: str) -> None:
        super().__init__()
        self.upstream = upstream
        self.joining: asyncio.Task[None] | None = None  # held here: the loop keeps only a weak reference

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.joining = asyncio.get_running_loop().create_task(self._join())

    async def _join(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, up = await asyncio.wait_for(loop.create_unix_connection(_Pipe, self.upstream), CONNECT_TIMEOUT_S)
        except (OSError, TimeoutError):
            if self.transport is not None:
                self.transport.close()
            return
        self.peer, up.peer = up, self
        if self.transport is None or self.transport.is_closing():
            if up.transport is not None:
                up.transport.close()  # the client left while the upstream connection was being made
            return
        if up.transport is not None:
            for data in self.early:
                up.transport.write(data)
        self.early.clear()


async def serve(listen: str, upstream: str) -> None:
    """Relay ``listen`` → ``upstream`` until cancelled."""
    server = await asyncio.get_running_loop().create_unix_server(lambda: _Downstream(upstream), listen)
    async with server:
        await server.serve_forever()


@contextlib.asynccontextmanager
async def relay_chain(upstream: str, hops: int = 2, timeout_s: float = 10.0) -> AsyncIterator[tuple[str, list[int]]]:
    """``hops`` relays in a chain in front of the Unix socket ``upstream``, each a process of its own; yields
    the first one's socket and their pids; stopped on exit."""
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="lw-relay-") as tmp:
        try:
            target = upstream
            for hop in range(hops):
                listen = str(Path(tmp) / f"hop{hops - hop}.sock")
                procs.append(track(subprocess.Popen([sys.executable, "-m", "loadtests.relay", listen, target],
                                                    cwd=REPO_ROOT, stdout=subprocess.DEVNULL)))
                await wait_until(functools.partial(os.path.exists, listen), timeout_s, f"relay on {listen}")
                target = listen
            yield target, [proc.pid for proc in procs]
        finally:
            for proc in procs:
                stop_process(proc, 5.0)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        sys.exit("usage: python -m loadtests.relay LISTEN_SOCKET UPSTREAM_SOCKET")
    install_uvloop()
    listen, upstream = args
    if os.path.exists(listen):
        os.unlink(listen)
    try:
        asyncio.run(serve(listen, upstream))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
