"""The registry in Redis: customers, API keys, versions, pointers, request logs.

Writes are atomic (MULTI) and each publishes an event so every ingress's
local view refreshes at once. Keys are stored as SHA-256 hashes only; the
key itself is returned once, at creation.
"""
from __future__ import annotations

import dataclasses
import hashlib
import secrets
import time
from typing import Any

import orjson
import redis.asyncio as redis

from shared import keys
from shared.errors import not_found
from shared.messages import VersionSpec

LOG_LIMIT = 1000
LOGS_PAGE = 50
LOGS_ANSWER_BYTES = 16 * 2**20
# Request records written per pipeline (each a step of the event loop of its own).
LOG_SLICE = 64
KEY_PREFIX = "lw_"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


@dataclasses.dataclass(frozen=True)
class KeyRecord:
    id: str
    customer: str
    scopes: tuple[str, ...]
    expires_at: float | None = None

    def to_json(self) -> bytes:
        return orjson.dumps({"id": self.id, "customer": self.customer, "scopes": list(self.scopes),
                             "expires_at": self.expires_at})

    @classmethod
    def from_json(cls, raw: bytes | str) -> "KeyRecord":
        data = orjson.loads(raw)
        return cls(id=data["id"], customer=data["customer"], scopes=tuple(data["scopes"]),
                   expires_at=data.get("expires_at"))

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at


def event(kind: str, **fields: Any) -> bytes:
    return orjson.dumps({"kind": kind, **fields})


class Registry:
    """Typed access to the registry keys of ``shared.keys``."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    # ---- customers and keys ------------------------------------------------------

    async def put_customer(self, name: str) -> bool:
        """Create a customer; False when it existed (idempotent)."""
        created = await self.redis.set(keys.customer(name), orjson.dumps({"name": name, "created_at": time.time()}),
                                       nx=True)
        await self.redis.sadd(keys.CUSTOMERS, name)
        return bool(created)

    async def customer_exists(self, name: str) -> bool:
        return bool(await self.redis.exists(keys.customer(name)))

    async def create_key(self, customer: str, scopes: tuple[str, ...],
                         expires_in_s: int | None = None) -> tuple[KeyRecord, str]:
        """A new key (returned once, stored as its hash); one with an expiry also vanishes from Redis then."""
        key = KEY_PREFIX + secrets.token_urlsafe(30)
        expires_at = None if expires_in_s is None else round(time.time() + expires_in_s, 3)
        record = KeyRecord(id=secrets.token_hex(6), customer=customer, scopes=scopes, expires_at=expires_at)
        digest = hash_key(key)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(keys.api_key(digest), record.to_json(), ex=expires_in_s)
            pipe.hset(keys.customer_keys(customer), record.id, digest)
            await pipe.execute()
        return record, key

    async def delete_key(self, customer: str, key_id: str) -> None:
        digest = await self.redis.hget(keys.customer_keys(customer), key_id)
        if digest is None:
            raise not_found(f"no key {key_id!r} for customer {customer!r}")
        digest = digest.decode() if isinstance(digest, bytes) else digest
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(keys.api_key(digest))
            pipe.hdel(keys.customer_keys(customer), key_id)
            pipe.publish(keys.EVENTS_CHANNEL, event("key", hash=digest))
            await pipe.execute()

    async def list_keys(self, customer: str) -> list[str]:
        ids = await self.redis.hkeys(keys.customer_keys(customer))
        return sorted(i.decode() if isinstance(i, bytes) else i for i in ids)

    async def lookup_key(self, key: str) -> KeyRecord | None:
        if len(key) > 256:
            return None  # no key is that long: spare Redis the round trip
        raw = await self.redis.get(keys.api_key(hash_key(key)))
        return None if raw is None else KeyRecord.from_json(raw)

    # ---- versions and pointers ---------------------------------------------------

    async def create_version(self, customer: str, model: str, branch: str, fields: dict[str, Any],
                             move_latest: bool = True) -> VersionSpec:
        """Take the next version number and store the version; ``latest`` moves to it when asked."""
        number = int(await self.redis.incr(keys.version_counter(customer, model, branch)))
        spec = VersionSpec(customer=customer, model=model, branch=branch, version=number,
                           created_at=time.time(), **fields)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(keys.version(customer, model, branch, number), orjson.dumps(spec.to_dict()))
            pipe.sadd(keys.versions_index(customer, model, branch), number)
            pipe.sadd(keys.branches_index(), f"{customer}/{model}/{branch}")
            if spec.capacity.min > 0:
                pipe.hset(keys.CAPACITY_FLOOR, spec.key, spec.capacity.min)  # kept ready from now on
            if not move_latest:  # else advance_latest tells the ingresses, once latest has moved
                pipe.publish(keys.EVENTS_CHANNEL, event("pointers", branch=f"{customer}/{model}/{branch}"))
            await pipe.execute()
        if move_latest:
            await self.advance_latest(customer, model, branch, number)
        return spec

    async def withdraw_version(self, spec: VersionSpec, why: str = "") -> None:
        """Undo a version that never got ready: its number is given back when no later one was taken
        (a refused deploy uses no version number); otherwise it stays, retired, with ``why``."""
        counter = keys.version_counter(spec.customer, spec.model, spec.branch)
        async with self.redis.pipeline(transaction=True) as pipe:
            try:
                await pipe.watch(counter)
                if int(await pipe.get(counter) or 0) == spec.version:
                    pipe.multi()
                    # A retired tombstone, not a deletion: proxies remove replicas only on a record that
                    # says so, never on a missing one (which is also what a Redis data loss looks like).
                    tomb = dataclasses.replace(spec, retired=True, rollout_error=why)
                    pipe.set(keys.version(spec.customer, spec.model, spec.branch, spec.version),
                             orjson.dumps(tomb.to_dict()))
                    pipe.srem(keys.versions_index(spec.customer, spec.model, spec.branch), spec.version)
                    pipe.hdel(keys.CAPACITY_FLOOR, spec.key)
                    pipe.decr(counter)
                    # Ingresses that cached this number drop it: the next deploy may reuse it for other code.
                    pipe.publish(keys.EVENTS_CHANNEL, event("version", key=spec.key))
                    await pipe.execute()
                    return
            except redis.WatchError:
                pass  # a later deploy took the next number meanwhile
        await self.save_version(dataclasses.replace(spec, retired=True, rollout_error=why))

    async def get_version(self, customer: str, model: str, branch: str, number: int) -> VersionSpec | None:
        raw = await self.redis.get(keys.version(customer, model, branch, number))
        return None if raw is None else VersionSpec.from_dict(orjson.loads(raw))

    async def save_version(self, spec: VersionSpec) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(keys.version(spec.customer, spec.model, spec.branch, spec.version), orjson.dumps(spec.to_dict()))
            # The capacity loop's index follows a PATCHed capacity.min and a retirement.
            if spec.capacity.min > 0 and not spec.retired:
                pipe.hset(keys.CAPACITY_FLOOR, spec.key, spec.capacity.min)
            else:
                pipe.hdel(keys.CAPACITY_FLOOR, spec.key)
            pipe.publish(keys.EVENTS_CHANNEL, event("version", key=spec.key))
            await pipe.execute()

    async def advance_latest(self, customer: str, model: str, branch: str, number: int) -> bool:
        """Move ``latest`` to ``number`` unless a newer version already holds it; whether it moved.

        Two deploys racing (one pre-warming) never move it backwards: compare-and-set under WATCH.
        """
        pointers = keys.pointers(customer, model, branch)
        for _ in range(100):
            async with self.redis.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(pointers)
                    current = await pipe.hget(pointers, "latest")
                    if current is not None and int(current) >= number:
                        return False
                    pipe.multi()
                    pipe.hset(pointers, "latest", number)
                    pipe.publish(keys.EVENTS_CHANNEL, event("pointers", branch=f"{customer}/{model}/{branch}"))
                    await pipe.execute()
                    return True
                except redis.WatchError:
                    continue  # another writer moved a pointer meanwhile: look again
        raise RuntimeError(f"latest of {customer}/{model}/{branch} kept changing")

    async def live_versions(self, customer: str, model: str, branch: str) -> list[int]:
        """The branch's version numbers that are not retired, ascending."""
        numbers = sorted(int(n) for n in await self.redis.smembers(keys.versions_index(customer, model, branch)))
        if not numbers:
            return []
        raws = await self.redis.mget([keys.version(customer, model, branch, n) for n in numbers])
        return [n for n, raw in zip(numbers, raws) if raw is not None and not orjson.loads(raw).get("retired")]

    async def get_pointers(self, customer: str, model: str, branch: str) -> dict[str, int]:
        raw = await self.redis.hgetall(keys.pointers(customer, model, branch))
        return {(k.decode() if isinstance(k, bytes) else k): int(v) for k, v in raw.items()}

    async def set_pointer(self, customer: str, model: str, branch: str, name: str, number: int) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(keys.pointers(customer, model, branch), name, number)
            pipe.publish(keys.EVENTS_CHANNEL, event("pointers", branch=f"{customer}/{model}/{branch}"))
            await pipe.execute()

    async def delete_pointer(self, customer: str, model: str, branch: str, name: str) -> bool:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hdel(keys.pointers(customer, model, branch), name)
            pipe.publish(keys.EVENTS_CHANNEL, event("pointers", branch=f"{customer}/{model}/{branch}"))
            removed, _ = await pipe.execute()
        return bool(removed)

    async def require_version(self, customer: str, model: str, branch: str, number: int) -> VersionSpec:
        spec = await self.get_version(customer, model, branch, number)
        if spec is None or spec.retired:
            raise not_found(f"model {model!r} branch {branch!r} has no version {number}")
        return spec

    # ---- request logs -------------------------------------------------------------

    async def append_logs(self, entries: list[tuple[str, dict[str, Any]]]) -> None:
        """Push request records (``(logs key, record)``), keeping the newest LOG_LIMIT per branch.

        One LPUSH of many values per branch: packing a command per record held the event loop for
        milliseconds at every flush (PERFORMANCE.md). And one pipeline per ``LOG_SLICE`` records, each
        awaited: encoding and packing a half-second's 450 records at once held it for 1.8 ms.
        """
        for start in range(0, len(entries), LOG_SLICE):
            by_key: dict[str, list[bytes]] = {}
            for key, record in entries[start:start + LOG_SLICE]:
                by_key.setdefault(key, []).append(orjson.dumps(record))
            async with self.redis.pipeline(transaction=False) as pipe:
                for key, values in by_key.items():
                    pipe.lpush(key, *values)
                    pipe.ltrim(key, 0, LOG_LIMIT - 1)
                await pipe.execute()

    async def read_logs(self, customer: str, model: str, branch: str, limit: int,
                        max_bytes: int = LOGS_ANSWER_BYTES) -> tuple[list[dict[str, Any]], bool]:
        """The newest ``limit`` records, read a page at a time and stopped at ``max_bytes`` (records can be
        ~200 KB each: a thousand must not land in memory at once); whether it stopped early."""
        key = keys.request_logs(customer, model, branch)
        out: list[dict[str, Any]] = []
        size = 0
        for start in range(0, limit, LOGS_PAGE):
            page = await self.redis.lrange(key, start, min(limit, start + LOGS_PAGE) - 1)
            for raw in page:
                size += len(raw)
                if size > max_bytes and out:
                    return out, True
                out.append(orjson.loads(raw))
            if len(page) < LOGS_PAGE:
                break
        return out, False

    async def list_proxies(self) -> list[dict[str, Any]]:
        ids = await self.redis.zrange(keys.PROXIES, 0, -1)
        if not ids:
            return []
        names = [i.decode() if isinstance(i, bytes) else str(i) for i in ids]
        raws = await self.redis.mget([keys.proxy_heartbeat(name) for name in names])
        return [orjson.loads(r) for r in raws if r is not None]


