"""When the cyclic garbage collector runs, and over how much: the ingress's loop is never held long by it.

CPython's collector runs inside whatever callback allocated last. A full pass walks every tracked object
not frozen, and starts whenever the objects that survived into the old generation since the last one
reach a quarter of it. The ingress's fleet view holds ~37 tracked objects per proxy and heartbeats keep
replacing them: under load a full pass held the loop 46 ms at 1000 proxies and 105 ms at 5000, every
few seconds (``loadtests.fleet_scale --no-heap-keeper``). Young passes are short only while the young
generations are small, and churn (new objects replacing old ones, which die as they go) hardly moves
the allocation count that starts them.

- ``HeapKeeper.install``: no automatic full pass, and the middle generation collected every third young
  pass instead of every tenth. Its ``round``, run by an owned ``Periodic`` every ``thorough_every_s``
  (``LUKEWARM_GC_FULL_EVERY_S``, 600 s), is the full pass instead: the one long pause left, timed
  (``last_full_ms``).
- ``young_pass``: a young pass now; ``run_young_round`` every ``YOUNG_EVERY_S``, and the view's intake
  between slices, so a pass walks only what a few milliseconds made.

Nothing leaks meanwhile that would not leak anyway: objects the daemons drop are freed by reference
counting when they die (the view's states are acyclic), and young passes free reference cycles that die
young; only a cycle that dies after it grew old waits for the next full round.
"""
from __future__ import annotations

import dataclasses
import gc
import time

THOROUGH_EVERY_S = 600.0
# A young pass at least this often (HeapKeeper.run_young_round): between heartbeat polls the routing
# caches that requests fill on each heartbeat's states survive while the temporaries around them die,
# so the allocation count that would start a pass hardly moves while the youngest generation fills
# (2 800 objects, 0.8-1.3 ms per pass at 5000 proxies); every 20 ms a pass walks what 20 ms made
# (0.2-0.6 ms; every 50 ms: 0.9 ms). An idle daemon pays ~30 µs per round.
YOUNG_EVERY_S = 0.02
# Young passes per pass over the middle generation (CPython's default is 10): the middle generation then
# holds what three young passes kept, not ten (up to 7 000 objects, 1.7-3.5 ms at 5000 proxies, when
# requests fill the routing caches of heartbeats that the next ones replace).
YOUNG_PASSES_PER_MIDDLE = 3
# The old generation's threshold: gen1 passes between two automatic full passes. Never reached.
NO_AUTOMATIC_FULL = 2**31 - 1


def young_pass() -> None:
    """A pass over the young generations now, for work that replaces old objects with new ones.

    CPython starts a young pass when tracked allocations minus deallocations pass a threshold (700), so
    churn (the view's intake: each heartbeat's states replace the last ones, freed as they go) does not
    trigger one while the youngest generation fills with what it made; the pass that finally comes walks
    all of it (12 900 objects, 4 ms at 1000 proxies, in ``loadtests.fleet_scale``). Called between slices
    of such work, a pass walks only what the slice made; every ``threshold[1]``-th one takes the middle
    generation too, as an automatic pass would.
    """
    if not gc.isenabled():
        return
    gc.collect(1 if gc.get_count()[1] >= gc.get_threshold()[1] else 0)


# install()/uninstall() nest (tests run several ingress apps in one process): the first install saves the
# thresholds, the last uninstall puts them back.
_installs = 0
_saved: tuple[int, ...] = ()


@dataclasses.dataclass
class HeapKeeper:
    thorough_every_s: float = THOROUGH_EVERY_S
    rounds: int = 0
    last_full_ms: float = 0.0
    freed: int = 0  # unreachable objects the full passes found (cycles that died old)
    _installed: bool = False

    def install(self) -> None:
        """Young passes as before, the middle generation's more often, no automatic full pass (idempotent)."""
        global _installs, _saved
        if self._installed:
            return
        self._installed = True
        if _installs == 0:
            _saved = gc.get_threshold()
            gc.set_threshold(_saved[0], YOUNG_PASSES_PER_MIDDLE, NO_AUTOMATIC_FULL)
        _installs += 1

    def uninstall(self) -> None:
        global _installs
        if not self._installed:
            return
        self._installed = False
        _installs -= 1
        if _installs == 0:
            gc.set_threshold(*_saved)

    def round(self) -> int:
        """One full pass over what is not frozen; returns the unreachable objects it found."""
        started = time.perf_counter()
        found = gc.collect()
        self.last_full_ms = (time.perf_counter() - started) * 1e3
        self.rounds += 1
        self.freed += found
        return found

    async def run_round(self) -> None:
        """``round`` for a ``shared.background.Periodic``."""
        self.round()

    async def run_young_round(self) -> None:
        """``young_pass`` for a ``shared.background.Periodic`` every ``YOUNG_EVERY_S``."""
        young_pass()
