"""shared/hugeheap.py's decisions: when a daemon starts again on the huge-page heap, with what, and which part
of the heap its frontier keeper faults in."""
from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import pytest

from shared import hugeheap
from shared.hugeheap import (FRONTIER_BYTES, HUGE_PAGES_ENV, HeapFrontier, frontier, heap_bounds, huge_heap_env,
                             on_huge_heap, reserve_size, thp_mode)


@pytest.mark.parametrize(("line", "mode"), [
    ("always [madvise] never\n", "madvise"), ("[always] madvise never", "always"),
    ("always madvise [never]", "never"), ("", ""), ("garbled]", ""),
])
def test_thp_mode_is_the_bracketed_word(line: str, mode: str) -> None:
    assert thp_mode(line) == mode


def test_a_daemon_starts_again_on_glibc_malloc_with_huge_pages_and_only_once() -> None:
    env = huge_heap_env({"PATH": "/bin"}, "madvise")
    assert env is not None
    assert env["PATH"] == "/bin" and env["PYTHONMALLOC"] == "malloc"
    tunables = env["GLIBC_TUNABLES"].split(":")
    assert "glibc.malloc.hugetlb=1" in tunables
    assert f"glibc.malloc.top_pad={FRONTIER_BYTES}" in tunables
    assert on_huge_heap(env)
    assert huge_heap_env(env, "madvise") is None  # after the exec: no second one
    assert huge_heap_env({}, "always") is not None


def test_tunables_someone_set_are_kept_and_ours_appended() -> None:
    env = huge_heap_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "madvise")
    assert env is not None
    assert env["GLIBC_TUNABLES"].split(":")[0] == "glibc.malloc.arena_max=2"
    assert on_huge_heap(env)


@pytest.mark.parametrize("environ", [
    {HUGE_PAGES_ENV: "0"}, {HUGE_PAGES_ENV: "off"}, {HUGE_PAGES_ENV: " False "},
    {"PYTHONMALLOC": "pymalloc_debug"},  # someone's allocator choice stands
    {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"},  # someone's hugetlb choice stands
])
def test_switched_off_or_chosen_otherwise_it_does_not_start_again(environ: dict[str, str]) -> None:
    assert huge_heap_env(environ, "madvise") is None


@pytest.mark.parametrize("mode", ["never", ""])
def test_without_transparent_huge_pages_it_does_not_start_again(mode: str) -> None:
    assert huge_heap_env({}, mode) is None


def test_on_huge_heap_needs_both_the_allocator_and_the_tunable() -> None:
    assert not on_huge_heap({})
    assert not on_huge_heap({"PYTHONMALLOC": "malloc"})
    assert not on_huge_heap({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"})
    assert not on_huge_heap({"PYTHONMALLOC": "malloc", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=10"})
    assert on_huge_heap({"PYTHONMALLOC": "malloc", "GLIBC_TUNABLES": "a=1:glibc.malloc.hugetlb=1"})


MAPS = """\
55d0c3a00000-55d0c3a2c000 r--p 00000000 00:1f 123  /usr/bin/python3.11
55d0c5e00000-55d0c9e00000 rw-p 00000000 00:00 0                          [heap]
7f1e2c000000-7f1e2c021000 rw-p 00000000 00:00 0
7ffc1a5d2000-7ffc1a5f3000 rw-p 00000000 00:00 0                          [stack]
"""


def test_heap_bounds_come_from_the_heap_line_of_maps() -> None:
    assert heap_bounds(MAPS) == (0x55D0C5E00000, 0x55D0C9E00000)
    assert heap_bounds(MAPS.replace("[heap]", "")) is None


def test_the_frontier_is_the_heaps_last_bytes_page_aligned_and_never_below_its_start() -> None:
    start, end = 0x10_000_000, 0x10_000_000 + (100 << 20)
    assert frontier((start, end), 32 << 20) == (end - (32 << 20), 32 << 20)
    assert frontier((start, start + (8 << 20)), 32 << 20) == (start, 8 << 20)
    lo, length = frontier((start, end - 100), 32 << 20)
    assert lo % hugeheap.PAGE == 0 and lo + length == end - 100 and length >= 32 << 20


def test_the_reserve_is_half_the_heap_and_never_less_than_the_frontier() -> None:
    assert reserve_size(0) == FRONTIER_BYTES
    assert reserve_size(FRONTIER_BYTES) == FRONTIER_BYTES
    assert reserve_size(200 << 20) == 100 << 20


async def test_the_frontier_keeper_does_nothing_off_the_huge_heap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYTHONMALLOC", raising=False)
    called: list[int] = []
    monkeypatch.setattr(hugeheap, "populate_frontier", called.append)
    monkeypatch.setattr(hugeheap, "grow_heap", lambda size, keep_free: called.append(size))
    keeper = HeapFrontier()
    assert not keeper.active
    keeper.settle()
    await keeper.run_round()
    assert called == [] and keeper.rounds == 0


async def test_a_kernel_without_populate_turns_the_keeper_off_once(monkeypatch: pytest.MonkeyPatch,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    def refuse(size: int) -> bool:
        raise OSError(errno.EINVAL, "madvise(MADV_POPULATE_WRITE) on the heap's frontier")

    monkeypatch.setattr(hugeheap, "populate_frontier", refuse)
    grown: list[tuple[int, int]] = []
    monkeypatch.setattr(hugeheap, "grow_heap", lambda size, keep_free: grown.append((size, keep_free)))
    keeper = HeapFrontier(active=True)
    keeper.settle()
    assert not keeper.active and keeper.rounds == 0
    [(size, keep_free)] = grown  # the reserve was asked for, and is kept with room for the frontier
    assert size >= FRONTIER_BYTES and keep_free >= size + FRONTIER_BYTES and keep_free >= hugeheap.TRIM_THRESHOLD
    await keeper.run_round()  # off: no thread, no second warning
    assert sum("not kept resident" in r.message for r in caplog.records) == 1


def _thp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, line: str) -> None:
    setting = tmp_path / "enabled"
    setting.write_text(line)
    monkeypatch.setattr(hugeheap, "THP_SETTING", setting)
    for name in ("PYTHONMALLOC", "GLIBC_TUNABLES", HUGE_PAGES_ENV):
        monkeypatch.delenv(name, raising=False)


def test_it_starts_the_same_command_line_again_with_the_new_environment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _thp(tmp_path, monkeypatch, "always [madvise] never\n")
    calls: list[tuple[str, list[str], dict[str, str]]] = []
    monkeypatch.setattr(os, "execve", lambda path, argv, env: calls.append((path, argv, env)))
    hugeheap.exec_on_huge_heap()
    [(path, argv, env)] = calls
    assert path == sys.executable and argv == sys.orig_argv and on_huge_heap(env)


def test_a_failed_exec_leaves_the_daemon_running_on_small_pages(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    _thp(tmp_path, monkeypatch, "always [madvise] never\n")

    def refuse(path: str, argv: list[str], env: dict[str, str]) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "execve", refuse)
    hugeheap.exec_on_huge_heap()  # returns
    assert "stays on 4 KiB pages" in capsys.readouterr().err


def test_no_exec_where_the_kernel_has_no_thp_setting_or_it_is_never(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "execve", lambda *a: pytest.fail("exec"))
    _thp(tmp_path, monkeypatch, "always madvise [never]\n")
    hugeheap.exec_on_huge_heap()
    monkeypatch.setattr(hugeheap, "THP_SETTING", tmp_path / "absent")
    hugeheap.exec_on_huge_heap()


async def test_a_heap_that_moved_under_a_round_skips_that_round_only(monkeypatch: pytest.MonkeyPatch) -> None:
    outcomes = [OSError(errno.ENOMEM, "Cannot allocate memory"), None]

    def populate(size: int) -> bool:
        outcome = outcomes.pop(0)
        if outcome is not None:
            raise outcome
        return True

    monkeypatch.setattr(hugeheap, "populate_frontier", populate)
    keeper = HeapFrontier(active=True)
    await keeper.run_round()
    assert keeper.active and keeper.rounds == 0
    await keeper.run_round()
    assert keeper.rounds == 1


def test_a_hidden_proc_turns_the_keeper_off_without_stopping_the_daemon(monkeypatch: pytest.MonkeyPatch) -> None:
    def hidden(self: Path) -> str:
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", hidden)
    monkeypatch.setattr(hugeheap, "grow_heap", lambda size, keep_free: pytest.fail("grew without bounds"))
    keeper = HeapFrontier(active=True)
    keeper.settle()  # no exception: the daemon starts
    assert not keeper.active and keeper.rounds == 0
