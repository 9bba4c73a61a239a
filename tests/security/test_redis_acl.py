"""Redis access per role: the ACL users of deploy/redis-acl.conf, loaded into the real test Redis.

Each test loads the file's ``lukewarm-ingress`` and ``lukewarm-proxy`` lines as ``ACL SETUSER``
under names unique to the run, with throwaway passwords, and deletes them afterwards (the
default user and every other user are left alone). The stack then runs under those users —
a ``python -m runtime_proxy`` subprocess and the ingress — and serves a call; every registry
and heartbeat call the code makes is driven too, and the server's ACL LOG must hold no refusal
of them. Then each user is tried, as someone holding its password would, on what its role must
not reach.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import os
import secrets
import shutil
import subprocess
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aredis
from redis.exceptions import AuthenticationError, NoPermissionError, RedisError, ResponseError

from tests.conftest import missing
from tests.support.stack import REPO_ROOT, ProxyProcess, Stack, free_port, stop_process, wait_until

pytestmark = [pytest.mark.security, pytest.mark.integration, pytest.mark.timeout(180)]

ACL_FILE = REPO_ROOT / "deploy" / "redis-acl.conf"
INGRESS, PROXY = "lukewarm-ingress", "lukewarm-proxy"
ROLES = (INGRESS, PROXY)
ECHO = "def predict(x):\n    return {'echo': x}\n"
# Sent by redis-py on every connect, refused by the file on purpose (see its header), and ignored
# by redis-py: Redis 7.0 answers "unknown subcommand" (no ACL LOG entry), 7.2+ logs a refusal.
IGNORED_REFUSALS = {"client|setinfo", "client|maint_notifications"}
PASSWORD_RULE_PREFIXES = (">", "<", "#", "!")
# Checked by ACL DRYRUN only: sent for real they would change the shared server, or a
# server setting (enable-debug-command) refuses them before the ACL is asked.
NOT_SENT: tuple[tuple[str, ...], ...] = (
    ("CONFIG", "SET", "appendonly", "no"), ("SHUTDOWN",), ("SWAPDB", "0", "15"), ("DEBUG", "SLEEP", "0"),
    ("MONITOR",), ("MODULE", "LIST"), ("REPLICAOF", "NO", "ONE"))


# ---- the file ---------------------------------------------------------------------------------


def acl_rules() -> dict[str, list[str]]:
    """``user NAME RULES…`` lines of deploy/redis-acl.conf: name → rules."""
    users: dict[str, list[str]] = {}
    for line in ACL_FILE.read_text().splitlines():
        words = line.split()
        if words and words[0] == "user":
            users[words[1]] = words[2:]
    return users


def with_password(rules: list[str], rule: str) -> list[str]:
    """``rules`` with its one password rule (the file's placeholder) replaced by ``rule``."""
    placeholders = [r for r in rules if r.startswith(PASSWORD_RULE_PREFIXES) or r == "nopass"]
    assert len(placeholders) == 1, f"expected one password rule, found {placeholders}"
    return [rule if r == placeholders[0] else r for r in rules]


def user_url(base: str, user: str, password: str) -> str:
    parts = urllib.parse.urlsplit(base)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:{password}@{host}"))


def test_role_lines_grant_nothing_wholesale() -> None:
    rules = acl_rules()
    assert set(ROLES) <= set(rules), f"{ACL_FILE} lacks a user line of {ROLES}"
    wholesale = {"+@all", "allcommands", "~*", "%R~*", "%W~*", "allkeys", "&*", "allchannels", "nopass",
                 "+@dangerous", "+@admin", "+@scripting", "+client", "+config", "+keys", "+scan", "+debug",
                 "+flushall", "+flushdb", "+acl", "+eval", "+monitor", "+module", "+shutdown"}
    for role in ROLES:
        assert rules[role][0] == "reset", f"{role}: start with reset so ACL SETUSER replaces the user"
        assert "-@all" in rules[role], role
        assert not wholesale & set(rules[role]), (role, wholesale & set(rules[role]))
    assert not any(r.startswith("&") for r in rules[PROXY]), "the proxy needs no channel"


# ---- users in the test Redis ------------------------------------------------------------------


@dataclasses.dataclass
class AclUsers:
    admin: aredis.Redis
    names: dict[str, str]
    urls: dict[str, str]

    def client(self, role: str) -> aredis.Redis:
        return aredis.Redis.from_url(self.urls[role], socket_timeout=5, socket_connect_timeout=5)

    async def refusals(self) -> list[dict[str, Any]]:
        """ACL LOG entries of these users (all of the server's log is read, only ours kept)."""
        return [e for e in await refusals(self.admin) if e.get("username") in self.names.values()]

    async def assert_refused(self, role: str, *command: str, real: bool = True) -> None:
        """``command`` is refused to ``role``: by ACL DRYRUN, then (``real``) by sending it as that user.

        DRYRUN answers first, so a destructive command is only ever sent once the server said no.
        """
        verdict = _text(await self.admin.execute_command("ACL", "DRYRUN", self.names[role], *command))
        assert verdict != "OK", f"{role} may run {command}"
        if real:
            client = self.client(role)
            try:
                with pytest.raises(NoPermissionError):
                    await client.execute_command(*command)
            finally:
                await client.aclose()


def _text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


async def refusals(admin: aredis.Redis) -> list[dict[str, Any]]:
    """The server's ACL LOG, less the refusals redis-py ignores (IGNORED_REFUSALS)."""
    entries = [{_text(k): _text(v) for k, v in e.items()} for e in await admin.acl_log(count=1000)]
    return [e for e in entries if e.get("object") not in IGNORED_REFUSALS]


@pytest.fixture
async def acl_users(redis_url: str) -> AsyncIterator[AclUsers]:
    admin = aredis.Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=5)
    tag = uuid.uuid4().hex[:8]
    users = AclUsers(admin, {}, {})
    rules = acl_rules()
    try:
        for role in ROLES:
            name, password = f"{role}-t{tag}", secrets.token_hex(16)
            try:
                await admin.execute_command("ACL", "SETUSER", name, *with_password(rules[role], f">{password}"))
            except NoPermissionError as exc:
                missing(f"the test Redis user may not manage ACL users: {exc}")
            users.names[role], users.urls[role] = name, user_url(redis_url, name, password)
        yield users
    finally:
        if users.names:
            await admin.execute_command("ACL", "DELUSER", *users.names.values())
        await admin.aclose()


# ---- the stack under its users ----------------------------------------------------------------


async def test_stack_serves_under_its_acl_users(acl_users: AclUsers, state_dir: Path) -> None:
    # The stack's URL is what its proxies get; the ingress is given its own.
    stack = Stack(acl_users.urls[PROXY], state_dir, "process")
    proxy: ProxyProcess | None = None
    try:
        # Usage written often, so the run writes and reads it under both users (ingress/usage.py,
        # runtime_proxy/usage.py).
        proxy = await stack.add_proxy(usage_tick_s=0.1, usage_flush_s=0.2)
        await stack.start_ingress(redis_url=acl_users.urls[INGRESS], usage_flush_s=0.1)
        await stack.wait_for_proxies(1)
        await stack.customer("acme")
        version = await stack.deploy("echo", stack.model("echo", ECHO), entrypoint="model:predict")
        status, body, _ = await stack.call("echo", "hi")
        assert status == 200, (body, proxy.log()[-6000:])
        assert body == {"data": {"echo": "hi"}}
        await exercise_management(stack, version)
    finally:
        await stack.close()
    assert proxy is not None
    log = proxy.log()
    assert "NOPERM" not in log and "could not withdraw" not in log, log[-3000:]
    assert await acl_users.refusals() == []
    # The clean stop withdrew the heartbeat (DEL + ZREM under the proxy user).
    assert await acl_users.admin.exists(f"lw:proxy:{proxy.proxy_id}") == 0
    assert await acl_users.admin.zscore("lw:proxies", proxy.proxy_id) is None


async def exercise_management(stack: Stack, version: int) -> None:
    """The management calls a deployment makes, each through the ingress user."""
    branch = "/api/v1/customers/acme/models/echo/branches/main"
    assert (await stack.admin("PUT", f"{branch}/aliases/stable", {"version": version}))[0] == 200
    status, body, _ = await stack.call("echo", "by alias", version="stable")
    assert status == 200, body
    assert (await stack.admin("PATCH", f"{branch}/versions/{version}", {"timeout_s": 30}))[0] == 200
    assert (await stack.admin("GET", f"{branch}/versions/{version}"))[0] == 200
    assert (await stack.admin("DELETE", f"{branch}/aliases/stable"))[0] == 204
    status, logs = await stack.admin("GET", f"{branch}/logs?limit=5")
    assert status == 200 and logs["logs"], logs
    status, key = await stack.admin("POST", "/api/v1/customers/acme/keys", {})
    assert status == 201, key
    assert (await stack.admin("DELETE", f"/api/v1/customers/acme/keys/{key['id']}"))[0] in (200, 204)
    status, fleet = await stack.admin("GET", "/api/v1/status")
    assert status == 200 and fleet["proxies"], fleet
    status, ready, _ = await stack.request("GET", "/readyz")
    assert status == 200, ready
    await exercise_usage(stack)


async def exercise_usage(stack: Stack) -> None:
    """Requests counted by the ingress user, replica-seconds added by the proxy user, read by the ingress user."""
    seen: dict[str, Any] = {}

    async def billed() -> bool:
        status, answer = await stack.admin("GET", "/api/v1/customers/acme/usage")
        assert status == 200, answer
        seen.update(answer)
        return answer["total"]["requests"] >= 2 and answer["total"]["replica_seconds"] > 0

    await wait_until(billed, 10, "requests and replica-seconds in GET …/usage")
    assert seen["versions"][0]["model"] == "echo", seen


async def test_every_registry_and_heartbeat_call_passes_its_acl(acl_users: AclUsers) -> None:
    """The code's Redis calls one by one, so a path the served call skips is covered too."""
    from ingress.registry import Registry
    from ingress.view import StateView
    from runtime_proxy.heartbeat import Heartbeat
    from shared.settings import ProxySettings

    ingress, proxy = acl_users.client(INGRESS), acl_users.client(PROXY)
    events = acl_users.client(INGRESS)
    registry = Registry(ingress)
    view = StateView(registry)
    listener = asyncio.create_task(view.listen(events, lambda: None))

    async def subscribed() -> bool:
        # Channels are server-wide (other stacks may follow lw:events too): look for this user's client.
        return any(_text(c.get("user")) == acl_users.names[INGRESS] and str(c.get("sub")) == "1"
                   for c in await acl_users.admin.client_list())

    try:
        await wait_until(subscribed, 5, "the events listener subscribed to lw:events")
        assert await ingress.ping()  # the ingress client's health check (health_check_interval)
        await registry.put_customer("acme")
        assert await registry.customer_exists("acme")
        record, key = await registry.create_key("acme", ("predict",))
        assert await registry.lookup_key(key) == record
        assert await registry.list_keys("acme") == [record.id]
        fields = {"image": "dir:/nowhere", "entrypoint": "model:predict"}
        spec = await registry.create_version("acme", "echo", "main", fields)  # MULTI … PUBLISH … EXEC
        await registry.set_pointer("acme", "echo", "main", "stable", spec.version)
        assert await registry.get_pointers("acme", "echo", "main") == {"latest": 1, "stable": 1}
        assert await registry.delete_pointer("acme", "echo", "main", "stable")
        assert (await registry.require_version("acme", "echo", "main", 1)).version == 1
        await registry.save_version(dataclasses.replace(spec, timeout_s=5.0))
        given_back = await registry.create_version("acme", "echo", "main", fields, move_latest=False)
        await registry.withdraw_version(given_back)  # WATCH, GET, MULTI … EXEC: number 2 given back
        assert (await registry.get_version("acme", "echo", "main", 2)).retired  # type: ignore[union-attr]
        assert await registry.live_versions("acme", "echo", "main") == [1]  # SMEMBERS: rollback, versions
        kept = await registry.create_version("acme", "echo", "main", fields, move_latest=False)
        await registry.create_version("acme", "echo", "main", fields, move_latest=False)
        await registry.withdraw_version(kept)  # a later number was taken: UNWATCH, then retired
        assert (await registry.get_version("acme", "echo", "main", kept.version)).retired  # type: ignore[union-attr]
        await registry.append_logs([("lw:m:acme:echo:main:logs", {"request_id": "r1"})])
        assert await registry.read_logs("acme", "echo", "main", 5) == ([{"request_id": "r1"}], False)

        settings = ProxySettings(proxy_id=f"acl-{uuid.uuid4().hex[:6]}", advertise_url="http://127.0.0.1:1")

        async def no_state() -> dict[str, Any]:
            return {"replicas": []}

        heartbeat = Heartbeat(proxy, settings, no_state, "process")
        assert await heartbeat.take_epoch() >= 1
        await heartbeat.beat_once()
        await view.refresh()
        assert settings.proxy_id in {p.proxy_id for p in view.live_proxies()}
        assert settings.proxy_id in [p["proxy_id"] for p in await registry.list_proxies()]
        await proxy_reads_a_version(proxy, spec.key, spec.created_at)
        await heartbeat.withdraw()
        assert settings.proxy_id not in [p["proxy_id"] for p in await registry.list_proxies()]
        await registry.delete_key("acme", record.id)
        assert await registry.lookup_key(key) is None
        await usage_calls(ingress, proxy, spec)
    finally:
        view.stopping = True
        listener.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listener
        for client in (ingress, proxy, events):
            await client.aclose()
    assert await acl_users.refusals() == []


async def usage_calls(ingress: aredis.Redis, proxy: aredis.Redis, spec: Any) -> None:
    """Usage: the ingress's counts (HINCRBY, EXPIRE) and reads (HGETALL), the proxy's seconds (HINCRBYFLOAT,
    EXPIRE), each through its own user."""
    from ingress.usage import UsageCounter, read_buckets, usage_window
    from runtime_proxy.usage import UsageMeter

    counter = UsageCounter(ingress)
    with counter.counting(spec):
        pass
    assert await counter.flush() == 1
    clock = [1000.0]
    meter = UsageMeter(proxy, lambda: [{"replica_id": "r", "version": spec.key, "state": "running"}], 0.0,
                       monotonic=lambda: clock[0])
    await meter.tick()
    clock[0] += 2.5
    await meter.tick()
    assert meter.pending == {}, "the proxy's flush failed"
    buckets = await read_buckets(ingress, "acme", usage_window({}, time.time() + 60))
    totals = {metric: value for _, rows in buckets for values in rows.values() for metric, value in values.items()}
    assert totals["requests"] == 1 and totals["replica_seconds"] == pytest.approx(2.5), buckets


async def proxy_reads_a_version(client: aredis.Redis, key: str, created_at: float) -> None:
    """The proxy's check of a chunk's version against the registry (runtime_proxy/versions.py)."""
    try:
        from runtime_proxy.versions import VersionSource
    except ImportError:  # not in this tree: the GET it would send, sent by hand
        customer, model, branch, number = key.split("/")
        assert await client.get(f"lw:m:{customer}:{model}:{branch}:v:{number}") is not None
        return
    spec = await VersionSource(client, cache_s=5.0).get(key, created_at)
    assert spec.key == key


# ---- what each role must not reach ------------------------------------------------------------


async def seed_registry(acl_users: AclUsers) -> tuple[str, str]:
    """A customer, a key and a version, written by the ingress user; (API key hash key, version key)."""
    from ingress.registry import Registry, hash_key

    client = acl_users.client(INGRESS)
    try:
        registry = Registry(client)
        await registry.put_customer("acme")
        _, key = await registry.create_key("acme", ("predict", "deploy"))
        await registry.create_version("acme", "echo", "main", {"image": "dir:/nowhere", "entrypoint": "m:f"})
        await registry.append_logs([("lw:m:acme:echo:main:logs", {"stdout": "customer data"})])
    finally:
        await client.aclose()
    return f"lw:apikey:{hash_key(key)}", "lw:m:acme:echo:main:v:1"


async def test_proxy_user_reaches_only_its_heartbeat_and_version_records(acl_users: AclUsers) -> None:
    apikey, version = await seed_registry(acl_users)
    usage = "lw:usage:acme:2024060110"
    await acl_users.admin.hset(usage, "echo/main/1:replica_seconds", 100)
    client = acl_users.client(PROXY)
    try:
        assert await client.get(version) is not None  # the one registry read it has
        for key in (apikey, "lw:apikey:0", "lw:customer:acme", "lw:m:acme:echo:main:logs",
                    "lw:m:acme:echo:main:counter", "lw:proxy:another-host"):
            with pytest.raises(NoPermissionError):
                await client.get(key)
        with pytest.raises(NoPermissionError):
            await client.hgetall("lw:m:acme:echo:main:pointers")
        with pytest.raises(NoPermissionError):
            await client.zrange("lw:proxies", 0, -1)
        for key in (version, "lw:m:acme:echo:main:counter", "lw:m:x", apikey, "lw:customer:acme"):
            with pytest.raises(NoPermissionError):
                await client.set(key, b"{}")
        with pytest.raises(NoPermissionError):
            await client.hset("lw:m:acme:echo:main:pointers", "latest", 99)
        with pytest.raises(NoPermissionError):
            await client.mget([version])
        with pytest.raises(NoPermissionError):
            await client.publish("lw:events", b'{"kind": "pointers", "branch": "acme/echo/main"}')
        # Usage: it may add to a bucket (HINCRBYFLOAT, EXPIRE), and nothing else there or elsewhere.
        assert float(await client.hincrbyfloat(usage, "echo/main/1:replica_seconds", 1.5)) == 101.5
        assert await client.expire(usage, 3600)
        with pytest.raises(NoPermissionError):
            await client.hgetall(usage)
        with pytest.raises(NoPermissionError):
            await client.hincrby(usage, "echo/main/1:requests", 1)
        for key in (apikey, version, "lw:m:acme:echo:main:pointers", "lw:customer:acme", "lw:usagex"):
            with pytest.raises(NoPermissionError):
                await client.hincrbyfloat(key, "f", 1.0)
        with pytest.raises(NoPermissionError):
            await client.expire(version, 1)
    finally:
        await client.aclose()
    for command in (("FLUSHDB",), ("FLUSHALL",), ("KEYS", "*"), ("SCAN", "0"), ("CONFIG", "GET", "*"),
                    ("EVAL", "return 1", "0"), ("CLIENT", "LIST"), ("ACL", "LIST"), ("PUBLISH", "lw:events", "x"),
                    ("DEL", apikey), ("INCRBY", "lw:m:acme:echo:main:counter", "1"),
                    ("GET", usage), ("SET", usage, "x"), ("DEL", usage), ("HSET", usage, "f", "1"),
                    ("HDEL", usage, "echo/main/1:replica_seconds"), ("PERSIST", usage)):
        await acl_users.assert_refused(PROXY, *command)
    assert float(await acl_users.admin.hget(usage, "echo/main/1:replica_seconds") or 0) == 101.5
    for command in NOT_SENT + (("SUBSCRIBE", "lw:events"),):
        await acl_users.assert_refused(PROXY, *command, real=False)
    assert await acl_users.admin.get(version) is not None and await acl_users.admin.exists(apikey)


async def test_ingress_user_runs_no_dangerous_command(acl_users: AclUsers) -> None:
    await seed_registry(acl_users)
    for command in (("FLUSHALL",), ("FLUSHDB",), ("CONFIG", "GET", "*"), ("KEYS", "*"), ("SCAN", "0"),
                    ("EVAL", "return 1", "0"), ("ACL", "LIST"), ("CLIENT", "LIST"),
                    ("GET", "not-lukewarm"), ("SET", "not-lukewarm", "1"), ("PUBLISH", "other-channel", "x")):
        await acl_users.assert_refused(INGRESS, *command)
    for command in NOT_SENT + (("SUBSCRIBE", "other-channel"),):
        await acl_users.assert_refused(INGRESS, *command, real=False)
    assert await acl_users.admin.exists("lw:customer:acme")


# ---- the URL from a file ----------------------------------------------------------------------


async def test_proxy_reads_its_redis_url_from_a_file(acl_users: AclUsers, state_dir: Path) -> None:
    url = acl_users.urls[PROXY]
    password = urllib.parse.urlsplit(url).password or ""
    url_file = state_dir / "redis-url"
    with os.fdopen(os.open(url_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
        f.write(url + "\n")
    assert url_file.stat().st_mode & 0o777 == 0o600
    proxy = ProxyProcess("", state_dir, "process", f"aclfile-{uuid.uuid4().hex[:6]}",
                         heartbeat_interval_s=0.2, redis_url_file=url_file)
    del proxy.env["LUKEWARM_REDIS_URL"]
    try:
        await proxy.start()
        # The default URL names db 0 and no user: a heartbeat in the test db proves the file was read.
        await wait_until(lambda: acl_users.admin.exists(f"lw:proxy:{proxy.proxy_id}"), 10,
                         "the heartbeat written through the URL in the file")
        clients = await acl_users.admin.client_list()
        assert any(_text(c.get("user")) == acl_users.names[PROXY] for c in clients)
        assert proxy.pid is not None
        for leak in (f"/proc/{proxy.pid}/cmdline", f"/proc/{proxy.pid}/environ"):
            assert password.encode() not in Path(leak).read_bytes(), leak
    finally:
        proxy.stop()
    assert "NOPERM" not in proxy.log(), proxy.log()[-3000:]
    assert await acl_users.refusals() == []


# ---- the file loaded by a redis-server of its own ---------------------------------------------


def as_aclfile(text: str) -> str:
    """The file as deploy/README.md installs it as an aclfile: comment lines dropped (an aclfile has none)."""
    return "".join(line + "\n" for line in text.splitlines() if line.strip() and not line.startswith("#"))


def with_passwords(text: str, passwords: dict[str, str]) -> str:
    """``text`` with each user's placeholder replaced by ``#`` and the SHA-256 of its password."""
    out = []
    for line in text.splitlines():
        words = line.split()
        if words and words[0] == "user":
            digest = hashlib.sha256(passwords[words[1]].encode()).hexdigest()
            line = " ".join(words[:2] + with_password(words[2:], f"#{digest}"))
        out.append(line + "\n")
    return "".join(out)


def start_redis_server(workdir: Path, how: str, users: Path, tls: dict[str, Path] | None = None
                       ) -> tuple[subprocess.Popen[bytes], int]:
    """A redis-server of its own (free port, no persistence, output in ``workdir/redis.out``) taking
    its users from ``users``: ``how`` is ``aclfile`` or ``config`` (``user`` lines of a redis.conf).
    With ``tls`` (cert, key, ca files) it listens on a tls-port only."""
    server = shutil.which("redis-server")
    if server is None:
        missing("redis-server is not installed (`make test` installs it)")
    port = free_port()
    args = [str(server)] + ([str(users)] if how == "config" else []) + [
        "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(workdir)]
    if how == "aclfile":
        args += ["--aclfile", str(users)]
    if tls is None:
        args += ["--port", str(port)]
    else:
        args += ["--port", "0", "--tls-port", str(port), "--tls-cert-file", str(tls["cert"]),
                 "--tls-key-file", str(tls["key"]), "--tls-ca-cert-file", str(tls["ca"]),
                 "--tls-auth-clients", "no"]
    with open(workdir / "redis.out", "wb") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT), port


@pytest.mark.parametrize("how", ["aclfile", "config"])
def test_file_as_shipped_is_refused(tmp_path: Path, how: str) -> None:
    """Its placeholders are not passwords: a Redis given the file unedited does not start."""
    users = tmp_path / "users"
    users.write_text(as_aclfile(ACL_FILE.read_text()) if how == "aclfile" else ACL_FILE.read_text())
    proc, _ = start_redis_server(tmp_path, how, users)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pytest.fail(f"redis-server started with the placeholder passwords of {ACL_FILE} ({how})")
    finally:
        stop_process(proc)
    assert proc.returncode != 0
    assert "password hash must be exactly 64 characters" in (tmp_path / "redis.out").read_text()


@pytest.fixture(params=["aclfile", "config"])
def acl_server(request: pytest.FixtureRequest, tmp_path: Path
               ) -> Iterator[tuple[int, dict[str, str], subprocess.Popen[bytes], Path]]:
    """The file loaded by a redis-server of its own, each placeholder replaced by the SHA-256 of a
    throwaway password: as an aclfile, and as is (comments too) as redis.conf ``user`` lines.
    Yields (port, user → password, the server, its output)."""
    passwords = {name: secrets.token_hex(16) for name in acl_rules()}
    text = with_passwords(ACL_FILE.read_text(), passwords)
    users = tmp_path / "users"
    users.write_text(as_aclfile(text) if request.param == "aclfile" else text)
    proc, port = start_redis_server(tmp_path, request.param, users)
    try:
        yield port, passwords, proc, tmp_path / "redis.out"
    finally:
        stop_process(proc)


async def test_file_loads_into_redis(
        acl_server: tuple[int, dict[str, str], subprocess.Popen[bytes], Path]) -> None:
    port, passwords, proc, output = acl_server
    base = f"redis://127.0.0.1:{port}/0"

    async def answers() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"redis-server refused the users: {output.read_text()[-2000:]}")
        probe = aredis.Redis.from_url(user_url(base, "default", passwords["default"]), socket_timeout=1,
                                      socket_connect_timeout=1)
        try:
            return bool(await probe.ping())
        except (RedisError, OSError):
            return False
        finally:
            await probe.aclose()

    await wait_until(answers, 10, "redis-server with Lukewarm's users")
    anonymous = aredis.Redis.from_url(base, socket_timeout=2, socket_connect_timeout=2)
    ingress = aredis.Redis.from_url(user_url(base, INGRESS, passwords[INGRESS]), socket_timeout=2)
    proxy = aredis.Redis.from_url(user_url(base, PROXY, passwords[PROXY]), socket_timeout=2)
    try:
        with pytest.raises((AuthenticationError, ResponseError)):
            await anonymous.get("lw:customers")  # the default user has a password: no open door
        await ingress.set("lw:m:acme:echo:main:v:1", b"{}")
        assert await proxy.incr("lw:proxy:h1:epoch") == 1
        assert await proxy.get("lw:m:acme:echo:main:v:1") == b"{}"
        with pytest.raises(NoPermissionError):
            await proxy.set("lw:m:acme:echo:main:v:1", b"{}")
        # The usage selector loads from the file too: add to a bucket, nothing more.
        assert float(await proxy.hincrbyfloat("lw:usage:acme:2024060110", "echo/main/1:replica_seconds", 2)) == 2
        assert await ingress.hincrby("lw:usage:acme:2024060110", "echo/main/1:requests", 3) == 3
        assert await ingress.expire("lw:usage:acme:2024060110", 60)
        with pytest.raises(NoPermissionError):
            await proxy.delete("lw:usage:acme:2024060110")
        with pytest.raises(NoPermissionError):
            await ingress.execute_command("FLUSHALL")
    finally:
        for client in (anonymous, ingress, proxy):
            await client.aclose()


def test_url_with_a_user() -> None:
    assert user_url("redis://127.0.0.1:6379/15", "u", "p") == "redis://u:p@127.0.0.1:6379/15"
    assert user_url("rediss://old:pw@redis.internal:6380/0", "u", "p") == "rediss://u:p@redis.internal:6380/0"


# ---- TLS: rediss:// to a tls-port ------------------------------------------------------------------


def make_tls_files(workdir: Path) -> dict[str, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 signed by it (PEM files)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lukewarm test redis CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(hours=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    files = {"ca": workdir / "ca.pem", "cert": workdir / "redis.pem", "key": workdir / "redis.key"}
    files["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    files["key"].chmod(0o600)
    return files


async def test_proxy_over_tls_with_its_acl_user(tmp_path: Path) -> None:
    """deploy/README.md's TLS form: a rediss:// URL (CA in ssl_ca_certs) read from a file, to a tls-port."""
    passwords = {name: secrets.token_hex(16) for name in acl_rules()}
    users = tmp_path / "users.acl"
    users.write_text(as_aclfile(with_passwords(ACL_FILE.read_text(), passwords)))
    tls = make_tls_files(tmp_path)
    proc, port = start_redis_server(tmp_path, "aclfile", users, tls)
    admin = aredis.Redis.from_url(f"rediss://default:{passwords['default']}@127.0.0.1:{port}/0"
                                  f"?ssl_ca_certs={tls['ca']}", socket_timeout=2, socket_connect_timeout=2)
    proxy = ProxyProcess("", tmp_path, "process", f"tls-{uuid.uuid4().hex[:6]}", heartbeat_interval_s=0.2,
                         redis_url_file=tmp_path / "redis-url")
    proxy.env.pop("LUKEWARM_REDIS_URL")
    (tmp_path / "redis-url").write_text(f"rediss://{PROXY}:{passwords[PROXY]}@127.0.0.1:{port}/0"
                                        f"?ssl_ca_certs={tls['ca']}\n")
    (tmp_path / "redis-url").chmod(0o600)
    try:
        async def answers() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"redis-server did not start: {(tmp_path / 'redis.out').read_text()[-2000:]}")
            try:
                return bool(await admin.ping())
            except (RedisError, OSError):
                return False

        await wait_until(answers, 10, "redis-server on its tls-port")
        plain = aredis.Redis.from_url(f"redis://{PROXY}:{passwords[PROXY]}@127.0.0.1:{port}/0", socket_timeout=2,
                                      socket_connect_timeout=2)
        try:
            with pytest.raises((RedisError, OSError)):
                await plain.ping()  # the tls-port speaks nothing else
        finally:
            await plain.aclose()
        await proxy.start()
        await wait_until(lambda: admin.exists(f"lw:proxy:{proxy.proxy_id}"), 10, "the heartbeat over TLS")
        assert await admin.zscore("lw:proxies", proxy.proxy_id) is not None
        proxy.stop()  # a clean stop withdraws the heartbeat
        assert await admin.exists(f"lw:proxy:{proxy.proxy_id}") == 0
        assert await refusals(admin) == []
    finally:
        proxy.stop()
        await admin.aclose()
        stop_process(proc)
    assert "NOPERM" not in proxy.log(), proxy.log()[-3000:]


def test_readme_shows_the_files_lines() -> None:
    readme = (REPO_ROOT / "deploy" / "README.md").read_text()
    for line in ACL_FILE.read_text().splitlines():
        if line.startswith("user "):
            assert line in readme, f"deploy/README.md shows another ACL than {ACL_FILE.name}: {line.split()[1]}"
