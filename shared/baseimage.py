"""The base image ``lukewarm/python:bookworm``: Debian bookworm plus python3.

Built without any registry: ``debootstrap`` a minimal rootfs from the Debian
mirror this machine already uses, tar it and ``docker import`` it. The rootfs
tarball is cached so rebuilding after ``docker rmi`` takes seconds, not minutes.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

BASE_IMAGE = "lukewarm/python:bookworm"
SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
CACHE_TARBALL = "bookworm-python3.tar"

_DEBOOTSTRAP_TIMEOUT_S = 900.0
_TAR_TIMEOUT_S = 300.0
_IMPORT_TIMEOUT_S = 300.0
_RUN_TIMEOUT_S = 60.0
_INSPECT_TIMEOUT_S = 30.0

# Trimmed from the rootfs: package caches and docs are dead weight in every
# model image built on top.
_STRIP = ("var/cache/apt/archives/*.deb", "var/lib/apt/lists/*", "usr/share/doc", "usr/share/man")


class BaseImageError(RuntimeError):
    """Building or checking the base image failed; the message is one line."""


def _tail(text: str | bytes | None, limit: int = 300) -> str:
    """The last non-empty lines of tool output, squeezed onto one line."""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    tail = " | ".join(lines[-3:])
    return tail if len(tail) <= limit else "…" + tail[-limit:]


def _run(cmd: Sequence[str], timeout: float, what: str) -> subprocess.CompletedProcess[bytes]:
    """Run ``cmd``; on failure or timeout raise BaseImageError naming ``what``."""
    try:
        # Own session so a timeout kills debootstrap's whole tree of children
        # (chroot, dpkg, wget), not just the shell script at the top.
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)
    except FileNotFoundError:
        raise BaseImageError(f"{what}: {cmd[0]} not found") from None
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.communicate()
        raise BaseImageError(f"{what}: timed out after {timeout:.0f} s") from None
    if proc.returncode != 0:
        reason = _tail(err) or _tail(out) or "no output"
        raise BaseImageError(f"{what} failed (exit {proc.returncode}): {reason}")
    return subprocess.CompletedProcess(list(cmd), proc.returncode, out, err)


def configured_mirror(sources_dir: Path = Path("/etc/apt/sources.list.d"),
                      sources_list: Path = Path("/etc/apt/sources.list")) -> str:
    """The Debian mirror apt on this machine uses for bookworm, else the default.

    Using the machine's own mirror is what lets the build work where only
    that mirror (a proxy, a local snapshot) is reachable.
    """
    for path in sorted(sources_dir.glob("*.sources")):
        try:
            text = path.read_text()
        except OSError:
            continue
        # deb822: blank-line separated stanzas of "Key: value" fields.
        for stanza in re.split(r"\n\s*\n", text):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if line.startswith("#") or ":" not in line:
                    continue
                key, _, value = line.partition(":")
                fields[key.strip().lower()] = value.strip()
            if (SUITE in fields.get("suites", "").split()
                    and "deb" in fields.get("types", "deb").split()
                    and fields.get("enabled", "yes").lower() != "no"
                    and fields.get("uris")):
                return fields["uris"].split()[0].rstrip("/")
    try:
        lines = sources_list.read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        # One-line format: deb [options] URI suite components...
        words = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0]).split()
        if len(words) >= 3 and words[0] == "deb" and words[2] == SUITE:
            return words[1].rstrip("/")
    return DEFAULT_MIRROR


def image_exists(tag: str) -> bool:
    """Whether the local Docker engine has an image called ``tag``."""
    try:
        proc = subprocess.run(["docker", "image", "inspect", tag], stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              timeout=_INSPECT_TIMEOUT_S)
    except FileNotFoundError:
        raise BaseImageError("docker CLI not found") from None
    except subprocess.TimeoutExpired:
        raise BaseImageError(f"docker image inspect timed out after {_INSPECT_TIMEOUT_S:.0f} s") from None
    if proc.returncode == 0:
        return True
    err = proc.stderr.decode(errors="replace")
    if "No such image" in err or "No such object" in err:
        return False
    # Anything else (daemon down, permission denied) must not look like "missing
    # image", or we would start a pointless multi-minute build.
    raise BaseImageError(f"docker image inspect failed: {_tail(err) or 'no output'}")


def _mounts_under(root: Path) -> list[str]:
    """Mount points inside ``root``, deepest first."""
    prefix = str(root.resolve()) + "/"
    found: list[str] = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                # mountinfo escapes space, tab, newline and backslash as \ooo.
                point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4])
                if point.startswith(prefix):
                    found.append(point)
    except OSError:
        pass
    return sorted(found, key=len, reverse=True)


def _remove_rootfs(root: Path) -> None:
    # A debootstrap killed half-way can leave /proc, /sys or a bind-mounted
    # /dev inside the rootfs; deleting through those would hit the host.
    for point in _mounts_under(root):
        subprocess.run(["umount", "-l", point], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=30, check=False)
    if _mounts_under(root):
        raise BaseImageError(f"could not unmount everything under {root}; remove it by hand")
    shutil.rmtree(root, ignore_errors=True)


def _strip_rootfs(root: Path) -> None:
    for pattern in _STRIP:
        for path in root.glob(pattern):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def _debootstrap_tarball(tarball: Path, cache_dir: Path, mirror: str,
                         progress: Callable[[str], None]) -> None:
    """Create ``tarball`` from a fresh debootstrap; only ever a complete file."""
    if os.geteuid() != 0:
        raise BaseImageError("debootstrap needs root (run as root, or `sudo lukewarm image build-base`)")
    if shutil.which("debootstrap") is None:
        raise BaseImageError("debootstrap not found (apt-get install debootstrap)")
    root = Path(tempfile.mkdtemp(prefix="rootfs-", dir=cache_dir))
    partial = tarball.with_name(tarball.name + ".partial")
    try:
        progress(f"debootstrap {SUITE} from {mirror} (a few minutes)")
        try:
            _run(["debootstrap", "--variant=minbase", "--include=python3", SUITE, str(root), mirror],
                 _DEBOOTSTRAP_TIMEOUT_S, "debootstrap")
        except BaseImageError as exc:
            # debootstrap's stderr is often just "see the log"; the log says why.
            log = root / "debootstrap" / "debootstrap.log"
            detail = _tail(log.read_text(errors="replace")) if log.exists() else ""
            raise BaseImageError(f"{exc}{' | log: ' + detail if detail else ''}") from None
        _strip_rootfs(root)
        progress("packing rootfs")
        _run(["tar", "--numeric-owner", "-C", str(root), "-cf", str(partial), "."],
             _TAR_TIMEOUT_S, "tar")
        # Rename last: an interrupted build must not leave a truncated cache.
        partial.replace(tarball)
    finally:
        partial.unlink(missing_ok=True)
        _remove_rootfs(root)


def build_base(tag: str = BASE_IMAGE, cache_dir: Path | None = None,
               mirror: str = DEFAULT_MIRROR, *,
               progress: Callable[[str], None] | None = None) -> bool:
    """Build ``tag`` unless it exists. True when built, False when skipped.

    Raises BaseImageError with a one-line reason on any failure.
    """
    say = progress or (lambda _msg: None)
    if image_exists(tag):
        return False
    cache_dir = cache_dir or Path.home() / ".cache" / "lukewarm"
    cache_dir.mkdir(parents=True, exist_ok=True)
    tarball = cache_dir / CACHE_TARBALL
    if tarball.exists():
        say(f"using cached rootfs {tarball}")
    else:
        _debootstrap_tarball(tarball, cache_dir, mirror, say)
    say(f"docker import {tag}")
    _run(["docker", "import", "--change", 'CMD ["python3"]', "--change", "ENV LANG=C.UTF-8",
          str(tarball), tag], _IMPORT_TIMEOUT_S, "docker import")
    try:
        out = _run(["docker", "run", "--rm", "--network", "none", tag, "python3", "-c", "print(1)"],
                   _RUN_TIMEOUT_S, "verifying the image").stdout
        if out.strip() != b"1":
            raise BaseImageError(f"verifying the image: python3 printed {_tail(out)!r}, not 1")
    except BaseImageError:
        # A broken image under this tag would make every later build a "skip".
        subprocess.run(["docker", "rmi", "-f", tag], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=_INSPECT_TIMEOUT_S, check=False)
        raise
    return True


def main(argv: list[str] | None = None) -> int:
    """``lukewarm image build-base``: build the base image if it is missing."""
    parser = argparse.ArgumentParser(prog="lukewarm image build-base",
                                     description="Build the base image offline (idempotent).")
    parser.add_argument("--tag", default=BASE_IMAGE)
    parser.add_argument("--mirror", default=None, help="Debian mirror (default: the one apt uses here)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="default: ~/.cache/lukewarm")
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        built = build_base(args.tag, args.cache_dir, args.mirror or configured_mirror(),
                           progress=lambda msg: print(f"  {msg}", file=sys.stderr, flush=True))
    except BaseImageError as exc:
        print(f"base image {args.tag}: {exc}", file=sys.stderr)
        return 1
    if built:
        print(f"base image {args.tag}: built in {time.monotonic() - started:.0f} s")
    else:
        print(f"base image {args.tag}: exists")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
