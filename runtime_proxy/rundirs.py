"""Each replica's socket directory: the one host path a model can write, so it is small and private.

A run directory is bind-mounted into its container (the harness creates its
socket there). Left a plain directory, a model could fill the host's disk
through it; so, as root, each is its own tmpfs of ``size_kb`` (mode 0700,
owned by the container's user), unmounted when the replica goes. The root
above them is 0700 root: no other local user reaches any socket. Without
root (a laptop's process runtime) they are plain 0700 directories.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger("lukewarm.proxy")

MOUNT_TIMEOUT_S = 10.0


class RunDirError(Exception):
    """A run directory could not be made private and bounded."""


def _is_mount(path: Path) -> bool:
    with contextlib.suppress(OSError):
        return os.path.ismount(path)
    return False


class RunDirs:
    """Creates, bounds and removes replicas' run directories under ``root``."""

    def __init__(self, root: Path, owner_uid: int, size_kb: int) -> None:
        self.root = root
        self.owner_uid = owner_uid
        self.size_kb = size_kb
        self.as_root = os.geteuid() == 0

    def prepare(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)

    def make(self, replica_id: str) -> Path:
        """A fresh private directory for one replica (a bounded tmpfs when root); RunDirError if not."""
        if not self.root.is_dir():
            self.prepare()
        path = self.root / replica_id
        path.mkdir(mode=0o700)
        if not self.as_root:
            return path
        options = f"size={self.size_kb}k,mode=0700,uid={self.owner_uid},gid={self.owner_uid},nosuid,nodev,noexec"
        try:
            subprocess.run(["mount", "-t", "tmpfs", "-o", options, f"lukewarm-{replica_id}", str(path)],
                           check=True, capture_output=True, timeout=MOUNT_TIMEOUT_S)
        except (OSError, subprocess.SubprocessError) as exc:
            detail = getattr(exc, "stderr", b"") or b""
            with contextlib.suppress(OSError):
                path.rmdir()
            log.error("cannot mount a tmpfs at %s: %s %s", path, exc, detail.decode(errors="replace").strip())
            raise RunDirError("cannot give the replica a bounded socket directory") from None
        return path

    def remove(self, path: Path) -> None:
        """Unmount and delete a run directory; only ever below ``root``. Never raises."""
        if not path.is_relative_to(self.root) or path == self.root:
            return
        if _is_mount(path):
            # Lazy: a container being torn down may still hold it; the kernel frees it when it lets go.
            result = subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=MOUNT_TIMEOUT_S)
            if result.returncode != 0:
                log.warning("cannot unmount %s: %s", path, result.stderr.decode(errors="replace").strip())
                return
        shutil.rmtree(path, ignore_errors=True)

    def sweep(self, keep: Iterable[Path]) -> int:
        """Remove run directories no replica owns (left by a proxy that died); how many went."""
        kept = {p.resolve() for p in keep}
        removed = 0
        with contextlib.suppress(FileNotFoundError):
            for entry in self.root.iterdir():
                if entry.resolve() not in kept and not entry.is_symlink():
                    self.remove(entry)
                    removed += 1
        return removed
