"""Model images this proxy ran, and pruning the ones no replica here has used for long."""
from __future__ import annotations

import logging
from collections.abc import Iterable

from runtime_proxy import policy
from runtime_proxy.runtime import Runtime, RuntimeFailure

log = logging.getLogger("lukewarm.proxy")


class ImageBook:
    """When each image was last used here; ``prune`` applies ``policy.images_to_prune``."""

    def __init__(self, idle_s: float, max_images: int) -> None:
        self.idle_s = idle_s
        self.max_images = max_images
        self.last_used: dict[str, float] = {}

    def note(self, image: str, used_at: float) -> None:
        self.last_used[image] = max(self.last_used.get(image, 0.0), used_at)

    async def prune(self, runtime: Runtime, in_use: Iterable[tuple[str, float]], now: float) -> list[str]:
        """Remove images no replica here uses (``in_use``: image and last use of each replica's), least
        recently used first; an image the engine refuses to remove is kept for the next round."""
        using = set()
        for image, used_at in in_use:
            self.note(image, used_at)
            using.add(image)
        pruned = []
        for image in policy.images_to_prune(self.last_used, using, now, self.idle_s, self.max_images):
            try:
                await runtime.remove_image(image)
            except RuntimeFailure as exc:
                log.warning("could not remove image %s: %s", image, exc)
                continue
            del self.last_used[image]
            pruned.append(image)
        return pruned
