"""The cgroup freezer adapter on a fake cgroup tree: where it looks, what it writes, how it waits."""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from runtime_proxy import freezer

CID = "ab" * 32


def v1(root: Path, state: str = "THAWED") -> Path:
    d = root / "freezer" / "docker" / CID
    d.mkdir(parents=True)
    (d / "freezer.state").write_text(state + "\n")
    return d / "freezer.state"


def v2(root: Path, systemd: bool = False) -> Path:
    d = root / "system.slice" / f"docker-{CID}.scope" if systemd else root / "docker" / CID
    d.mkdir(parents=True)
    (d / "cgroup.freeze").write_text("0\n")
    (d / "cgroup.events").write_text("populated 1\nfrozen 0\n")
    return d / "cgroup.freeze"


def test_locate_finds_each_layout_and_refuses_what_is_not_a_container_id(tmp_path: Path) -> None:
    assert freezer.locate(CID, tmp_path) is None
    path = v1(tmp_path)
    assert freezer.locate(CID, tmp_path) == freezer.FreezerFile(path, v2=False)
    other = tmp_path / "two"
    assert freezer.locate(CID, other) is None
    assert freezer.locate(CID, other / "x") is None
    path2 = v2(other, systemd=True)
    assert freezer.locate(CID, other) == freezer.FreezerFile(path2, v2=True)
    # A name that could climb out of the cgroup tree is never joined into a path.
    for bad in ("../" * 5 + "etc", CID[:-1], CID.upper(), CID + "/..", ""):
        assert freezer.locate(bad, tmp_path) is None


async def test_v1_freeze_and_thaw_write_the_state_file(tmp_path: Path) -> None:
    path = v1(tmp_path)
    file = freezer.locate(CID, tmp_path)
    assert file is not None and not freezer.is_frozen(file)
    await freezer.freeze(file)
    assert path.read_text().strip() == "FROZEN" and freezer.is_frozen(file)
    freezer.thaw(file)
    assert path.read_text().strip() == "THAWED" and not freezer.is_frozen(file)


async def test_v2_freeze_waits_for_the_kernel_to_say_frozen(tmp_path: Path) -> None:
    path = v2(tmp_path)
    file = freezer.locate(CID, tmp_path)
    assert file is not None
    events = path.parent / "cgroup.events"

    async def kernel() -> None:
        while path.read_text().strip() != "1":
            await asyncio.sleep(0.001)
        events.write_text("populated 1\nfrozen 1\n")

    done = asyncio.create_task(kernel())
    await asyncio.wait_for(freezer.freeze(file), 2)
    await done
    assert file.state() == "frozen"
    freezer.thaw(file)
    assert path.read_text().strip() == "0" and not freezer.is_frozen(file)


async def test_a_freeze_that_never_completes_is_undone_and_reported(tmp_path: Path) -> None:
    path = v2(tmp_path)  # nobody ever writes "frozen 1": a task stuck in uninterruptible sleep
    file = freezer.locate(CID, tmp_path)
    assert file is not None
    with pytest.raises(freezer.FreezeFailed):
        await freezer.freeze(file, bound_s=0.05)
    assert path.read_text().strip() == "0", "a failed freeze must leave the container running, not half frozen"


def test_a_gone_cgroup_is_not_frozen_and_a_thaw_of_it_raises(tmp_path: Path) -> None:
    path = v1(tmp_path, "FROZEN")
    file = freezer.locate(CID, tmp_path)
    assert file is not None and freezer.is_frozen(file)
    path.unlink()
    path.parent.rmdir()
    assert not freezer.is_frozen(file)
    with pytest.raises(OSError):
        freezer.thaw(file)
