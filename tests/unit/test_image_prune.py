"""Pruning never removes an image that cannot be pulled again: the policy from tables, then the book
against a fake runtime (which images it asks about, and what it logs)."""
from __future__ import annotations

import logging

import pytest

from runtime_proxy.images import ImageBook
from runtime_proxy.policy import images_to_prune
from runtime_proxy.runtime import RuntimeFailure


@pytest.mark.parametrize(
    ("last_used", "in_use", "idle_s", "max_images", "pullable", "expected"),
    [
        # Idle past idle_s: only the pullable one goes.
        ({"local": 0.0, "pulled": 10.0}, set(), 50.0, 10, {"pulled"}, ["pulled"]),
        ({"local": 0.0, "pulled": 10.0}, set(), 50.0, 10, set(), []),
        # Over max_images: the local-only image still counts, so the oldest pullable goes in its place.
        ({"local": 0.0, "a": 90.0, "b": 95.0}, set(), 1000.0, 2, {"a", "b"}, ["a"]),
        ({"local": 0.0, "a": 90.0, "b": 95.0}, set(), 1000.0, 1, {"a", "b"}, ["a", "b"]),
        # In use beats pullable.
        ({"a": 0.0}, {"a"}, 10.0, 10, {"a"}, []),
        # None: every image pullable (a runtime whose images are never lost).
        ({"a": 0.0, "b": 99.0}, set(), 10.0, 10, None, ["a"]),
    ],
)
def test_images_to_prune_only_pullable(last_used: dict[str, float], in_use: set[str], idle_s: float,
                                       max_images: int, pullable: set[str] | None, expected: list[str]) -> None:
    assert images_to_prune(last_used, in_use, 100.0, idle_s, max_images, pullable=pullable) == expected


class FakeRuntime:
    """The two calls pruning makes; ``pullable`` answers from a set and counts the questions."""

    def __init__(self, pullable: set[str], broken: frozenset[str] = frozenset()) -> None:
        self.can_pull = pullable
        self.broken = broken
        self.asked: list[str] = []
        self.removed: list[str] = []

    async def pullable(self, image: str) -> bool:
        self.asked.append(image)
        if image in self.broken:
            raise RuntimeFailure("runtime_error", "docker: engine hiccup")
        return image in self.can_pull

    async def remove_image(self, image: str) -> None:
        self.removed.append(image)


async def test_prune_keeps_local_only_images_and_logs_once(caplog: pytest.LogCaptureFixture) -> None:
    book = ImageBook(idle_s=10.0, max_images=50, local_recheck_s=1000.0)
    runtime = FakeRuntime(pullable={"reg:5000/a/m@sha256:x"})
    book.note("lukewarm-acme/local:latest", 0.0)
    book.note("reg:5000/a/m@sha256:x", 0.0)
    with caplog.at_level(logging.INFO, logger="lukewarm.proxy"):
        assert await book.prune(runtime, [], now=100.0) == ["reg:5000/a/m@sha256:x"]  # type: ignore[arg-type]
        assert await book.prune(runtime, [], now=200.0) == []  # type: ignore[arg-type]
    assert runtime.removed == ["reg:5000/a/m@sha256:x"]
    assert set(book.last_used) == {"lukewarm-acme/local:latest"}
    # Asked once each: the local verdict is remembered until the recheck.
    assert sorted(runtime.asked) == ["lukewarm-acme/local:latest", "reg:5000/a/m@sha256:x"]
    kept = [r for r in caplog.records if "keeping image lukewarm-acme/local:latest" in r.getMessage()]
    assert len(kept) == 1


async def test_a_round_with_nothing_to_prune_asks_the_engine_nothing() -> None:
    book = ImageBook(idle_s=1000.0, max_images=50)
    runtime = FakeRuntime(pullable=set())
    book.note("a", 50.0)
    assert await book.prune(runtime, [("b", 99.0)], now=100.0) == []  # type: ignore[arg-type]
    assert runtime.asked == []


async def test_over_max_images_a_pullable_one_goes_in_a_local_ones_place() -> None:
    book = ImageBook(idle_s=1e9, max_images=2)
    runtime = FakeRuntime(pullable={"new", "newer"})
    for image, t in (("old-local", 1.0), ("new", 2.0), ("newer", 3.0)):
        book.note(image, t)
    assert await book.prune(runtime, [], now=10.0) == ["new"]  # type: ignore[arg-type]
    assert set(book.last_used) == {"old-local", "newer"}


async def test_local_images_are_asked_again_after_the_recheck() -> None:
    book = ImageBook(idle_s=10.0, max_images=50, local_recheck_s=100.0)
    runtime = FakeRuntime(pullable=set())
    book.note("img", 0.0)
    assert await book.prune(runtime, [], now=20.0) == []  # type: ignore[arg-type]
    assert await book.prune(runtime, [], now=60.0) == []  # type: ignore[arg-type]
    assert runtime.asked == ["img"]
    runtime.can_pull.add("img")  # pushed since
    assert await book.prune(runtime, [], now=130.0) == ["img"]  # type: ignore[arg-type]
    assert book.local_only == {}


async def test_an_image_the_engine_cannot_inspect_is_kept_this_round() -> None:
    book = ImageBook(idle_s=10.0, max_images=50)
    runtime = FakeRuntime(pullable={"a", "b"}, broken=frozenset({"a"}))
    book.note("a", 0.0)
    book.note("b", 0.0)
    assert await book.prune(runtime, [], now=100.0) == ["b"]  # type: ignore[arg-type]
    runtime.broken = frozenset()
    assert await book.prune(runtime, [], now=101.0) == ["a"]  # type: ignore[arg-type]
