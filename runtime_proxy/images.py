"""Model images this proxy ran, and pruning the ones no replica here has used for long."""
from __future__ import annotations

import logging
from collections.abc import Iterable

from runtime_proxy import policy
from runtime_proxy.runtime import Runtime, RuntimeFailure

log = logging.getLogger("lukewarm.proxy")

# How long an image found local-only (no registry holds it) is taken to stay so before the engine is
# asked again (it may have been pushed since): the check costs a call to the engine per image.
LOCAL_RECHECK_S = 600.0


class ImageBook:
    """When each image was last used here; ``prune`` applies ``policy.images_to_prune``, and removes only
    images that can be pulled again (``Runtime.pullable``)."""

    def __init__(self, idle_s: float, max_images: int, local_recheck_s: float = LOCAL_RECHECK_S) -> None:
        self.idle_s = idle_s
        self.max_images = max_images
        self.local_recheck_s = local_recheck_s
        self.last_used: dict[str, float] = {}
        # Images found local-only, and when: kept for good, logged once.
        self.local_only: dict[str, float] = {}

    def note(self, image: str, used_at: float) -> None:
        self.last_used[image] = max(self.last_used.get(image, 0.0), used_at)

    async def prune(self, runtime: Runtime, in_use: Iterable[tuple[str, float]], now: float) -> list[str]:
        """Remove images no replica here uses (``in_use``: image and last use of each replica's), least
        recently used first, never one that cannot be pulled again; an image the engine refuses to
        remove is kept for the next round."""
        using = set()
        for image, used_at in in_use:
            self.note(image, used_at)
            using.add(image)
        pruned = []
        for image in await self._plan(runtime, using, now):
            try:
                await runtime.remove_image(image)
            except RuntimeFailure as exc:
                log.warning("could not remove image %s: %s", image, exc)
                continue
            del self.last_used[image]
            self.local_only.pop(image, None)
            pruned.append(image)
        return pruned

    async def _plan(self, runtime: Runtime, using: set[str], now: float) -> list[str]:
        """The policy's choice among the images not known to be local-only. The engine is asked only about
        the images the policy picks (most rounds pick none, and cost no call); when one turns out local-only
        the policy is asked again without it, and may pick another in its place (asked about in turn)."""
        checked: set[str] = set()
        unsure: set[str] = set()  # the engine could not say: kept this round, asked again the next
        while True:
            local = {i for i, t in self.local_only.items() if now - t < self.local_recheck_s} | unsure
            plan = policy.images_to_prune(self.last_used, using, now, self.idle_s, self.max_images,
                                          pullable=set(self.last_used) - local)
            unknown = [image for image in plan if image not in checked]
            if not unknown:
                return plan
            for image in unknown:
                checked.add(image)
                try:
                    pullable = await runtime.pullable(image)
                except RuntimeFailure as exc:
                    log.warning("could not inspect image %s: %s", image, exc)
                    unsure.add(image)
                    continue
                if pullable:
                    self.local_only.pop(image, None)
                    continue
                if image not in self.local_only:
                    log.info("keeping image %s: no registry holds it, so it could not be pulled again "
                             "(deploy it from a registry to let it be pruned)", image)
                self.local_only[image] = now
