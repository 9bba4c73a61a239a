"""Runs a request's inputs on the fleet: pick proxies, split, fan out, retry, stitch.

Guarantees: outputs come back in the inputs' order; a chunk whose proxy
gave no answer is retried on another proxy (up to ``retries`` times); the
request's deadline bounds every chunk; the first real error cancels the
other chunks and is raised.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import random
import time
import uuid
from collections.abc import Callable
from typing import Any

from ingress.batching import chunk_ranges, plan_split
from ingress.costs import CostBook, start_tier
from ingress.proxy_client import ProxyClient, ProxyUnreachable
from ingress.router import Choice, choose_proxies
from ingress.spread import spread
from ingress.view import SAMPLE_D, StateView
from shared.errors import ReplicaFailed, deadline_exceeded, unavailable
from shared.messages import ChunkRequest, ChunkResult, VersionSpec, start_ms

# Below this many items a batch goes to one proxy: a second hop costs more than it saves.
MIN_CHUNK = 32
# The most proxies one request's chunks are spread over (each sampled, ranked and sent to).
MAX_SPLIT_PROXIES = 64
START_RANK = {"warm": 0, "lukewarm": 1, "cold": 2}


@dataclasses.dataclass
class Outcome:
    """All chunks of one request, stitched."""

    outputs: list[Any]
    stdout: str
    stderr: str
    error: str | None
    traceback: str | None
    start: str
    timings: dict[str, float]
    proxies: list[str]


class Dispatcher:
    def __init__(
        self, view: StateView, client: ProxyClient, costs: CostBook, retries: int, max_age_s: float,
        rng: random.Random | None = None, clock: Callable[[], float] = time.time, max_pending: int = 1000,
        hedge_factor: float = 4.0, hedge_min_ms: float = 200.0,
    ) -> None:
        self.max_pending = max_pending
        self.hedge_factor = hedge_factor
        self.hedge_min_ms = hedge_min_ms
        self.hedges = 0
        self._pending: collections.Counter[str] = collections.Counter()
        # Chunks this ingress has in flight per (version, proxy): fresher than heartbeats during a burst.
        self._sent: dict[str, collections.Counter[str]] = {}
        self.view = view
        self.client = client
        self.costs = costs
        self.retries = retries
        self.max_age_s = max_age_s
        self.rng = rng or random.Random()
        self.clock = clock

    def pending(self, version_key: str) -> int:
        """Requests of a version in flight at this ingress (running or held)."""
        return self._pending[version_key]

    def pending_all(self) -> dict[str, int]:
        """``pending`` of every version with requests in flight here."""
        return dict(self._pending)

    def _may_start(self, spec: VersionSpec) -> bool:
        """Whether a proxy may add a replica of ``spec``: fewer than ``capacity.max`` run across the fleet
        (as of the last heartbeats; two ingresses may overshoot by a beat, and idle replicas pause soon).
        O(the version's holders), whatever the fleet."""
        return self.view.running_of(spec.key) < spec.capacity.max

    def _choices(self, spec: VersionSpec, exclude: frozenset[str] = frozenset(), d: int = SAMPLE_D,
                 one_chunk: bool = True) -> list[Choice]:
        """The proxies holding the version and ``d`` sampled ones with room (``StateView.candidates``),
        ranked: the cost of a request's routing does not grow with the fleet.

        ``one_chunk``: only the first choice will be used. Then, while this ingress has none of the version's
        requests in flight, a holder with a warm slot free goes first whatever is sampled (``spread``
        leaves it there: nothing queues at it), so no cold host is sampled. With requests in flight the
        heartbeat may show a slot that ours have taken since, and ``spread`` may need a cold host."""
        cold_if_busy = one_chunk and spec.key not in self._sent
        candidates = self.view.candidates(spec.key, self.rng, d=d, max_age_s=self.max_age_s, exclude=exclude,
                                          cold_if_busy=cold_if_busy)
        return choose_proxies(candidates, spec.key, self.view.routing_now(), self.rng, self.costs.costs(spec.key),
                              self.max_age_s, exclude)

    async def run(self, spec: VersionSpec, inputs: list[Any], deadline: float, request_id: str,
                  batch: bool = False) -> Outcome:
        """Bounded per version: past ``max_pending`` requests in flight, new ones get 503 at once; batch
        work yields (it is refused past half of that), so that on-demand requests always find room."""
        limit = self.max_pending // 2 if batch else self.max_pending
        if self._pending[spec.key] >= limit:
            raise unavailable(f"{self._pending[spec.key]} requests for this version are already waiting", 1)
        self._pending[spec.key] += 1
        try:
            return await self._run(spec, inputs, deadline, request_id, batch)
        finally:
            self._pending[spec.key] -= 1
            if not self._pending[spec.key]:
                del self._pending[spec.key]

    async def _run(self, spec: VersionSpec, inputs: list[Any], deadline: float, request_id: str,
                   batch: bool) -> Outcome:
        # A big batch may be split over as many proxies as it has chunks' worth of items: sample that many.
        d = max(SAMPLE_D, min(len(inputs) // MIN_CHUNK, MAX_SPLIT_PROXIES))
        one_chunk = len(inputs) < 2 * MIN_CHUNK
        choices = self._choices(spec, d=d, one_chunk=one_chunk) \
            or await self._fresh_choices(spec, frozenset(), d, one_chunk) or await self._hold(spec, deadline, one_chunk)
        # From the version's holders (O(holders)): once per request, shared by its chunks.
        may_start = self._may_start(spec)
        choices = spread(choices, spec.key, self._sent.get(spec.key, {}), may_start,
                         self.costs.costs(spec.key).infer_ms)
        if not choices:
            raise unavailable("no runtime proxy is alive to run this model", retry_after_s=2)
        if one_chunk:
            plan = [(choices[0], (0, len(inputs)))]
        else:
            costs = self.costs.costs(spec.key)
            sizes = plan_split(len(inputs), [c.expected_ms for c in choices], costs.infer_ms, MIN_CHUNK)
            used = [(c, s) for c, s in zip(choices, sizes) if s > 0]
            plan = list(zip([c for c, _ in used], chunk_ranges([s for _, s in used])))
        run_id = uuid.uuid4().hex  # names each chunk for every copy of it (retries, hedges): see _run_chunk
        chunks = [self._run_chunk(spec, inputs[a:b], choice, deadline, request_id, batch=batch, may_start=may_start,
                                  chunk_id=f"{run_id}:{a}") for choice, (a, b) in plan]
        if len(chunks) == 1:  # most calls: awaited in this task (a task and a gather cost ~7 µs here)
            return self._stitch([await chunks[0]])
        tasks = [asyncio.create_task(chunk) for chunk in chunks]
        try:
            results = await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        return self._stitch(results)

    async def _run_chunk(self, spec: VersionSpec, inputs: list[Any], choice: Choice, deadline: float,
                         request_id: str, batch: bool = False, may_start: bool = True,
                         chunk_id: str = "") -> ChunkResult:
        """One chunk, retried on another proxy when its proxy gave no answer (at most ``retries`` times once
        it may have run there). A chunk that reached no proxy at all (refused: a proxy restarting) is held
        until one beats again, within its deadline, else 503 + Retry-After.

        When the connection broke after the chunk was sent, the same proxy is asked once more first: if it
        is up, the chunk id joins the run there (or gets its answer) instead of running the model twice."""
        tried: set[str] = set()
        asked_again: set[str] = set()
        reached_any = 0
        while True:
            remaining = deadline - self.clock()
            if remaining <= 0:
                raise deadline_exceeded()
            tried.add(choice.proxy.proxy_id)
            chunk = ChunkRequest(spec=spec, inputs=inputs, timeout_s=remaining, request_id=request_id,
                                 may_start=may_start, batch=batch, chunk_id=chunk_id)
            try:
                result = await self._send(spec, choice, chunk, frozenset(tried))
            except ProxyUnreachable as exc:
                reached_any += exc.reached
                if exc.reached and chunk_id and choice.proxy.proxy_id not in asked_again:
                    asked_again.add(choice.proxy.proxy_id)
                    continue
                self.view.suspect(choice.proxy.proxy_id)
                if reached_any and spec.at_most_once:
                    raise ReplicaFailed("the proxy running this chunk stopped answering; it may have run, and "
                                        "this version runs each chunk at most once", "proxy_unreachable") from None
                others = self._choices(spec, exclude=frozenset(tried))
                if not others:
                    others = await self._fresh_choices(spec, frozenset(tried))
                if reached_any > self.retries or (not others and reached_any):
                    raise ReplicaFailed(f"no proxy answered for this chunk ({exc})", "proxy_unreachable") from None
                if not others:
                    others = await self._hold(spec, deadline)
                if not others:
                    raise unavailable("no runtime proxy could take this chunk before its deadline", 2) from None
                choice = others[0]
                continue
            self._learn(spec, result, len(inputs))
            return result

    async def _send(self, spec: VersionSpec, choice: Choice, chunk: ChunkRequest,
                    tried: frozenset[str]) -> ChunkResult:
        """One chunk on ``choice``; a straggler on a warm replica is hedged on a second warm proxy.

        First answer wins and the other call is cancelled; a failed copy waits for the other.
        """
        primary = asyncio.ensure_future(self._counted(spec, choice, chunk))
        hedge_after_s = self._hedge_after_s(spec, choice, len(chunk.inputs))
        if hedge_after_s is None:
            return await primary
        try:
            done, _ = await asyncio.wait({primary}, timeout=hedge_after_s)
            if done:
                return primary.result()
            backups = [c for c in self._choices(spec, exclude=tried) if c.tier == "warm"]
            if not backups:
                return await primary
            self.hedges += 1
            backup = asyncio.ensure_future(self.client.run(backups[0].proxy.url, chunk))
            return await self._first_success(primary, backup)
        finally:
            primary.cancel()

    async def _counted(self, spec: VersionSpec, choice: Choice, chunk: ChunkRequest) -> ChunkResult:
        sent = self._sent.setdefault(spec.key, collections.Counter())
        sent[choice.proxy.proxy_id] += 1
        try:
            return await self.client.run(choice.proxy.url, chunk)
        finally:
            sent[choice.proxy.proxy_id] -= 1
            if not sent[choice.proxy.proxy_id]:
                del sent[choice.proxy.proxy_id]
                if not sent:
                    del self._sent[spec.key]

    @staticmethod
    async def _first_success(primary: asyncio.Future[ChunkResult], backup: asyncio.Future[ChunkResult]) -> ChunkResult:
        pending = {primary, backup}
        try:
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    if not task.cancelled() and task.exception() is None:
                        return task.result()
            return primary.result()  # both failed: the primary's error stands
        finally:
            for task in (primary, backup):
                task.cancel()

    def _hedge_after_s(self, spec: VersionSpec, choice: Choice, items: int) -> float | None:
        """When to send a copy: ``hedge_factor`` × the measured time, for warm replicas only
        (hedging a cold start would start two replicas)."""
        if self.hedge_factor <= 0 or spec.at_most_once or choice.tier != "warm" or not self.costs.measured(spec.key):
            return None
        expected_ms = self.costs.costs(spec.key).infer_ms * items
        return max(self.hedge_min_ms, self.hedge_factor * expected_ms) / 1000

    async def prewarm(self, spec: VersionSpec, count: int, deadline: float) -> list[str]:
        """A ready replica of ``spec`` on ``count`` distinct proxies (best first); their ids.

        Raises the first failure (the version never got ready) or 503 when fewer proxies live.
        """
        choices = (self._choices(spec, d=count, one_chunk=False)
                   or await self._fresh_choices(spec, frozenset(), count, one_chunk=False))[:count]
        if len(choices) < count:
            raise unavailable(f"{count} replicas asked for, {len(choices)} proxies alive", retry_after_s=2)
        chunk = ChunkRequest(spec=spec, inputs=[], timeout_s=max(0.0, deadline - self.clock()), request_id="prewarm")
        tasks = [asyncio.ensure_future(self.client.warm(c.proxy.url, chunk)) for c in choices]
        try:
            answers = await asyncio.gather(*tasks)
        except ProxyUnreachable as exc:
            raise ReplicaFailed(f"pre-warm: {exc}", "proxy_unreachable") from None
        finally:
            for task in tasks:
                task.cancel()
        return [str(a.get("proxy_id")) for a in answers]

    async def _hold(self, spec: VersionSpec, deadline: float, one_chunk: bool = True) -> list[Choice]:
        """Wait, bounded by ``deadline``, for any proxy to be routable again (a restarted one beats again;
        one that refused us stays out until it does); [] when none is by then."""
        delay_s = 0.05
        while self.clock() + delay_s < deadline:
            await asyncio.sleep(delay_s)  # a bounded backoff between reads of the fleet, not a synchronisation
            choices = await self._fresh_choices(spec, frozenset(), one_chunk=one_chunk)
            if choices:
                return choices
            delay_s = min(delay_s * 2, 1.0)
        return []

    async def _fresh_choices(self, spec: VersionSpec, exclude: frozenset[str], d: int = SAMPLE_D,
                             one_chunk: bool = True) -> list[Choice]:
        """Candidates after re-reading the fleet: a proxy may have started since the last poll."""
        try:
            await asyncio.wait_for(self.view.refresh(), 2.0)
        except Exception:  # noqa: BLE001 - an unreachable registry just means no fresh candidates
            return []
        return self._choices(spec, exclude, d, one_chunk)

    def _learn(self, spec: VersionSpec, result: ChunkResult, items: int) -> None:
        self.costs.record(spec.key, start_tier(result.start, result.timings), start_ms(result.timings),
                          result.timings.get("infer_ms", 0.0), items)

    @staticmethod
    def _stitch(results: list[ChunkResult]) -> Outcome:
        outputs: list[Any] = []
        error = traceback = None
        timings: dict[str, float] = {}
        for r in results:
            if r.error is not None and error is None:
                error, traceback = r.error, r.traceback
            if r.outputs is not None:
                outputs.extend(r.outputs)
            for k, v in r.timings.items():
                timings[k] = max(timings.get(k, 0.0), v)
        start = max((r.start for r in results), key=lambda s: START_RANK.get(s, 0))
        multi = len(results) > 1
        return Outcome(
            outputs=outputs,
            stdout="".join(f"[chunk {i}] {r.stdout}" if multi and r.stdout else r.stdout for i, r in enumerate(results)),
            stderr="".join(f"[chunk {i}] {r.stderr}" if multi and r.stderr else r.stderr for i, r in enumerate(results)),
            error=error, traceback=traceback, start=start, timings=timings,
            proxies=[r.proxy_id for r in results],
        )
