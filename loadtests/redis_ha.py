"""A real highly available Redis on loopback, for tests and benchmarks: Sentinel, failed over for real.

``redis_ha()`` starts one primary ``redis-server``, one replica (``--replicaof``) and three
``redis-sentinel`` processes (quorum 2) on free ports, each Sentinel with its own config file in a
temp dir (Sentinels rewrite their config), no persistence on the servers. It yields an ``HARedis``:
``url`` (``redis+sentinel://…/<service>/<db>``, what ``shared.redisclient.connect`` takes),
``primary_port()``, ``failover()`` (graceful: ``SENTINEL FAILOVER``, writes on the old primary
paused meanwhile so that none is lost), ``kill_primary()`` (SIGKILL,
Sentinels elect a new primary on their own) and ``revive()`` (the killed server back on its port,
as a replica), ``wait_settled()``. Every wait is bounded; on exit every process started here is
stopped (Sentinels first, so stopping the servers starts no failover) and the temp dir removed.

The Sentinels are tuned to fail over in seconds (``DOWN_AFTER_MS``), not the production 30 s.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from loadtests.common import free_port, log, stop_process, track, wait_until
from shared.redisclient import FOLLOW_WAIT_S, RECHECK_S

SERVICE = "lukewarm"
HOST = "127.0.0.1"
QUORUM = 2
SENTINELS = 3
# A primary that does not answer for this long is down to a Sentinel (production: 30 s or so).
DOWN_AFTER_MS = 1000
# Bounds each step of a failover (promotion, replicas reconfigured). A Sentinel does not start an
# automatic failover of a primary again within twice this of its last try, so it stays small.
FAILOVER_TIMEOUT_MS = 3000
# How long a client may take to stop writing to a paused old primary, on top of its own command
# timeout: shared.redisclient re-checks the primary every RECHECK_S (waiting FOLLOW_WAIT_S at most).
CLIENT_FOLLOW_S = RECHECK_S + FOLLOW_WAIT_S + 0.5
PROBE_KEY = "redis-ha:probe"
PROBE_TIMEOUT_S = 0.5
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 5.0

@dataclasses.dataclass
class _Process:
    """One ``redis-server`` or ``redis-sentinel`` of the set, on a fixed port."""

    port: int
    argv: list[str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = track(subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check(self) -> None:
        """Raise when the process exited on its own: waiting for it to answer would be pointless."""
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"{self.argv[0]} on port {self.port} exited with {self.proc.returncode}: "
                               f"{self.log_tail()}")

    def kill(self) -> None:
        if self.running():
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, STOP_TIMEOUT_S)

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


class HARedis:
    """A primary, replicas and Sentinels started by ``redis_ha``; see the module's docstring."""

    def __init__(self, workdir: Path, db: int, service: str = SERVICE) -> None:
        self.workdir = workdir
        self.db = db
        self.service = service
        self.servers: dict[int, _Process] = {}
        self.sentinels: dict[int, _Process] = {}
        self.killed: int | None = None  # the port of the server kill_primary killed, until revived
        self._clients: dict[int, redis.Redis] = {}

    @property
    def url(self) -> str:
        return self.url_for(self.db)

    def url_for(self, db: int) -> str:
        hosts = ",".join(f"{HOST}:{port}" for port in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.service}/{db}"

    # ---- processes ---------------------------------------------------------------------------

    def _server(self, port: int, primary: int | None) -> _Process:
        server = shutil.which("redis-server")
        if server is None:
            raise RuntimeError("redis-server is not installed")
        argv = [server, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no",
                "--dir", str(self.workdir), "--dbfilename", f"dump-{port}.rdb",
                "--logfile", str(self.workdir / f"redis-{port}.log"),
                # A replica (re)joining gets its copy at once, not after the default 5 s wait for others.
                "--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0"]
        if primary is not None:
            argv += ["--replicaof", HOST, str(primary)]
        return _Process(port, argv, self.workdir / f"redis-{port}.log")

    def _sentinel(self, port: int, primary: int) -> _Process:
        config = self.workdir / f"sentinel-{port}.conf"
        log_path = self.workdir / f"sentinel-{port}.log"
        config.write_text("\n".join([
            f"port {port}", f"bind {HOST}", "daemonize no", f"dir {self.workdir}", f"logfile {log_path}",
            f"sentinel monitor {self.service} {HOST} {primary} {QUORUM}",
            f"sentinel down-after-milliseconds {self.service} {DOWN_AFTER_MS}",
            f"sentinel failover-timeout {self.service} {FAILOVER_TIMEOUT_MS}",
            f"sentinel parallel-syncs {self.service} 1", ""]))
        binary = shutil.which("redis-sentinel")
        if binary is None:
            raise RuntimeError("redis-sentinel is not installed (Debian: apt-get install redis-sentinel)")
        return _Process(port, [binary, str(config)], log_path)

    async def start(self, replicas: int = 1, timeout_s: float = START_TIMEOUT_S) -> None:
        """Primary, then replicas in sync, then Sentinels that know all of them and each other."""
        primary = free_port()
        self.servers[primary] = self._server(primary, None)
        self.servers[primary].start()
        await wait_until(lambda: self._answers(primary), timeout_s, f"redis-server on port {primary}")
        for _ in range(replicas):
            port = free_port()
            self.servers[port] = self._server(port, primary)
            self.servers[port].start()
        for _ in range(SENTINELS):
            port = free_port()
            self.sentinels[port] = self._sentinel(port, primary)
            self.sentinels[port].start()
        await self.wait_settled(timeout_s)
        log(f"HA Redis up: primary {primary}, replicas {sorted(set(self.servers) - {primary})}, "
            f"sentinels {sorted(self.sentinels)}")

    def stop(self) -> None:
        """Sentinels first: servers going away must not start a failover."""
        for proc in [*self.sentinels.values(), *self.servers.values()]:
            proc.stop()

    async def close_clients(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            with contextlib.suppress(redis.RedisError, OSError):
                await client.aclose()

    def logs(self) -> str:
        """The tail of every log, for a failure message."""
        return "\n".join(f"--- port {p.port}:\n{p.log_tail(800)}"
                         for p in [*self.servers.values(), *self.sentinels.values()])

    # ---- asking ------------------------------------------------------------------------------

    def _client(self, port: int) -> redis.Redis:
        """A short-timeout, never-retrying client: a probe answers now or counts as not answering."""
        client = self._clients.get(port)
        if client is None:
            client = self._clients[port] = redis.Redis(
                host=HOST, port=port, socket_timeout=PROBE_TIMEOUT_S, socket_connect_timeout=PROBE_TIMEOUT_S,
                retry=Retry(NoBackoff(), 0), decode_responses=True, protocol=2)
        return client

    async def _ask(self, port: int, *command: Any) -> Any:
        return await self._client(port).execute_command(*command)

    async def _answers(self, port: int) -> bool:
        self.servers[port].check()
        try:
            return bool(await self._ask(port, "PING"))
        except (redis.RedisError, OSError):
            return False

    async def _sentinel_primary(self, port: int) -> int | None:
        try:
            answer = await self._ask(port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)
        except (redis.RedisError, OSError):
            return None
        return int(answer[1]) if answer else None

    async def primary_port(self) -> int:
        """The primary's port, as the first Sentinel that answers names it."""
        for port in self.sentinels:
            found = await self._sentinel_primary(port)
            if found is not None:
                return found
        raise RuntimeError(f"no Sentinel names a primary for {self.service}")

    async def replica_ports(self) -> list[int]:
        """Ports of the running servers other than the primary."""
        primary = await self.primary_port()
        return sorted(port for port, proc in self.servers.items() if port != primary and proc.running())

    async def role(self, port: int) -> str:
        """``master`` or ``slave``, as the server at ``port`` says (``ROLE``)."""
        return str((await self._ask(port, "ROLE"))[0])

    async def _agreed_primary(self) -> int | None:
        """The primary every Sentinel names, when they all name the same one."""
        named = {await self._sentinel_primary(port) for port in self.sentinels}
        return named.pop() if len(named) == 1 else None

    async def _takes_writes(self, port: int) -> bool:
        try:
            role = await self._ask(port, "ROLE")
            return role[0] == "master" and bool(await self._ask(port, "SET", PROBE_KEY, str(time.time())))
        except (redis.RedisError, OSError):
            return False

    # ---- waiting -----------------------------------------------------------------------------

    async def _settled(self) -> bool:
        for proc in [*self.servers.values(), *self.sentinels.values()]:
            if proc.port != self.killed:
                proc.check()
        primary = await self._agreed_primary()
        if primary is None or not await self._takes_writes(primary):
            return False
        replicas = {port for port, proc in self.servers.items() if port != primary and proc.running()}
        try:
            info = await self._ask(primary, "INFO", "replication")
            online = {int(v["port"]) for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)
                      and v.get("state") == "online"}
            for port in self.sentinels:
                if not await self._sentinel_sees(port, replicas):
                    return False
        except (redis.RedisError, OSError, KeyError, ValueError):
            return False
        return replicas <= online

    async def _sentinel_sees(self, port: int, replicas: set[int]) -> bool:
        """Sentinel at ``port`` sees the primary up, no failover going on, the other Sentinels, ``replicas`` up."""
        master = await self._ask(port, "SENTINEL", "MASTER", self.service)
        state = dict(zip(master[::2], master[1::2]))
        if state["flags"] != "master" or int(state["num-other-sentinels"]) < SENTINELS - 1:
            return False
        seen = set()
        for entry in await self._ask(port, "SENTINEL", "REPLICAS", self.service):
            replica = dict(zip(entry[::2], entry[1::2]))
            if replica["flags"] == "slave" and replica["master-link-status"] == "ok":
                seen.add(int(replica["port"]))
        return replicas <= seen

    async def wait_settled(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Until every Sentinel names the same primary, which takes writes and has every running
        replica in sync, and each Sentinel sees the others and those replicas (ready to fail over)."""
        try:
            await wait_until(self._settled, timeout_s, "the Redis primary, replicas and Sentinels to settle", 0.1)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n{self.logs()}") from None

    async def _wait_new_primary(self, old: int, timeout_s: float) -> int:
        found: list[int] = []

        async def switched() -> bool:
            primary = await self._agreed_primary()
            if primary is None or primary == old or not await self._takes_writes(primary):
                return False
            found.append(primary)
            return True

        try:
            await wait_until(switched, timeout_s, f"the Sentinels to name a new primary instead of {old}", 0.05)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n{self.logs()}") from None
        return found[-1]

    # ---- failing over ------------------------------------------------------------------------

    async def failover(self, timeout_s: float = 30.0, pause_writes: bool = True,
                       client_timeout_s: float = 2.0) -> int:
        """``SENTINEL FAILOVER``: a replica is promoted without the primary failing. Returns the new
        primary's port once every Sentinel names it and it takes writes (and, with ``pause_writes``,
        once the old one may take writes again).

        The old primary takes writes until the Sentinels demote it (10 s or more later) and they are
        lost then. ``pause_writes`` makes it a switchover that loses nothing: writes on the old
        primary are paused first (``CLIENT PAUSE … WRITE``; a write sent to it waits, times out after
        the client's ``client_timeout_s`` and is retried by the client on the new primary), and
        resumed only once every client of shared.redisclient has stopped sending it writes.
        ``wait_settled`` then waits for the demotion."""
        old = await self.primary_port()
        started = time.monotonic()
        if pause_writes:
            await self._ask(old, "CLIENT", "PAUSE", str(int(timeout_s * 1000)), "WRITE")
        try:
            await wait_until(self._sentinel_failover, timeout_s, "a Sentinel to accept SENTINEL FAILOVER", 0.2)
            new = await self._wait_new_primary(old, timeout_s - (time.monotonic() - started))
            switched = time.monotonic()
            log(f"failover {old} → {new} in {switched - started:.2f} s")
            if pause_writes:
                # Nothing to observe here: the clients' promise is a time (they re-check the primary
                # that often, and a write sent to the old one before they did times out by then).
                hold_s = CLIENT_FOLLOW_S + client_timeout_s
                await wait_until(lambda: time.monotonic() - switched > hold_s, hold_s + 1,
                                 "clients to stop writing to the old primary")
        finally:
            if pause_writes:
                with contextlib.suppress(redis.RedisError, OSError):
                    await self._ask(old, "CLIENT", "UNPAUSE")
        return new

    async def _sentinel_failover(self) -> bool:
        for port in self.sentinels:
            try:
                return bool(await self._ask(port, "SENTINEL", "FAILOVER", self.service))
            except redis.ResponseError as exc:  # NOGOODSLAVE / INPROG: the set is not ready yet
                log(f"SENTINEL FAILOVER: {exc}")
                return False
            except (redis.RedisError, OSError):
                continue
        return False

    async def kill_primary(self, timeout_s: float = 30.0, revive: bool = False) -> int:
        """SIGKILL the primary; return the new primary's port once the Sentinels elected it (after
        ``DOWN_AFTER_MS`` and an election) and it takes writes. ``revive``: then bring the killed
        server back as its replica (``revive()``)."""
        old = await self.primary_port()
        started = time.monotonic()
        self.servers[old].kill()
        self.killed = old
        new = await self._wait_new_primary(old, timeout_s)
        log(f"primary {old} killed; {new} took over in {time.monotonic() - started:.2f} s")
        if revive:
            await self.revive(timeout_s)
        return new

    async def revive(self, timeout_s: float = 30.0) -> None:
        """Restart the server ``kill_primary`` killed, on its port, as a replica of the current
        primary; returns once it is in sync and the Sentinels see it."""
        if self.killed is None:
            raise RuntimeError("no killed server to revive")
        port, primary = self.killed, await self.primary_port()
        self.servers[port] = self._server(port, primary)
        self.servers[port].start()
        self.killed = None
        await self.wait_settled(timeout_s)


@contextlib.asynccontextmanager
async def redis_ha(db: int = 1, replicas: int = 1, timeout_s: float = START_TIMEOUT_S) -> AsyncIterator[HARedis]:
    """A running HA Redis (see the module's docstring); everything it started is stopped on exit."""
    workdir = Path(tempfile.mkdtemp(prefix="lwha-", dir="/tmp"))
    ha = HARedis(workdir, db)
    try:
        await ha.start(replicas, timeout_s)
        yield ha
    finally:
        await ha.close_clients()
        await asyncio.to_thread(ha.stop)
        shutil.rmtree(workdir, ignore_errors=True)


async def _main() -> None:
    """``python -m loadtests.redis_ha``: start the set, fail it over both ways, stop it."""
    async with redis_ha() as ha:
        log(f"url {ha.url}")
        await ha.failover()
        await ha.wait_settled()
        await ha.kill_primary(revive=True)


if __name__ == "__main__":
    from loadtests.common import run_async

    run_async(_main())
