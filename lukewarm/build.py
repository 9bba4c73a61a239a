"""``lukewarm deploy --build DIR`` for a directory without a Dockerfile: a model image built offline.

The container build reaches no network, so dependencies are resolved on the host: the wheels of
``DIR/requirements.txt`` for the base image's Python (CPython 3.11, manylinux x86_64, glibc 2.36) are
fetched into a wheelhouse (``~/.cache/lukewarm/wheels``, reused), installed on the host into the build
context (``pip install --target``, from the wheelhouse only), and copied into the image, which needs no
pip. A ``DIR/train.py`` runs at build time (``RUN python3 train.py`` with the code and its
dependencies), so a model can be trained or its weights prepared into the image. The tag is the
content's: ``lukewarm-<customer>/<model>:<sha256 of the context, 12 digits>`` — the same code builds the
same tag, and a different one never moves an old tag.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from shared.baseimage import BASE_IMAGE

# The base image's interpreter and platform (shared/baseimage.py: Debian bookworm's python3).
PYTHON_VERSION = "3.11"
PLATFORMS = ("manylinux_2_36_x86_64", "manylinux_2_34_x86_64", "manylinux_2_28_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64", "linux_x86_64")
PIP_TIMEOUT_S = 900.0
# What never goes into an image from the model's directory.
IGNORED = {".git", "__pycache__", ".venv", "venv", ".mypy_cache", ".pytest_cache", "Dockerfile"}

INIT_MAIN = '''"""A Lukewarm model: `predict` gets one input (any JSON) and returns one output (any JSON)."""


def predict(data):
    return {"echo": data}
'''
INIT_README = '''# {name}

`main.py` holds `predict`; list what it imports in `requirements.txt` (installed offline into the image);
an optional `train.py` runs once at build time (e.g. to fit a model and save it next to `main.py`).

    lukewarm deploy {name} --build . --wait
    lukewarm call {name} --data '"hello"'
'''


class BuildError(RuntimeError):
    """A build step failed; the message is one line."""


def wheelhouse_dir() -> Path:
    return Path(os.environ.get("LUKEWARM_WHEELHOUSE") or Path.home() / ".cache" / "lukewarm" / "wheels")


def _pip(*args: str, what: str) -> None:
    platform_args = [a for p in PLATFORMS for a in ("--platform", p)]
    cmd = [sys.executable, "-m", "pip", *args, "--only-binary=:all:", "--python-version", PYTHON_VERSION,
           "--implementation", "cp", *platform_args, "--disable-pip-version-check", "-q"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise BuildError(f"{what}: pip took longer than {PIP_TIMEOUT_S:.0f} s") from None
    if done.returncode != 0:
        lines = [line for line in (done.stderr or done.stdout).splitlines() if line.strip() and "WARNING" not in line]
        raise BuildError(f"{what}: {' | '.join(lines[-2:])[:400] or 'pip failed'}")


def install_requirements(requirements: Path, target: Path, wheels: Path | None = None) -> None:
    """The requirements' wheels into ``wheels`` (fetched once), then installed from there into ``target``."""
    wheels = wheels or wheelhouse_dir()
    wheels.mkdir(parents=True, exist_ok=True)
    _pip("download", "-r", str(requirements), "-d", str(wheels), what=f"fetching the wheels of {requirements}")
    # --no-compile: no .pyc with build times in them, so the same requirements give the same content tag.
    _pip("install", "--no-index", "--no-compile", "--find-links", str(wheels), "--target", str(target),
         "-r", str(requirements), what=f"installing {requirements}")


def content_tag(context: Path) -> str:
    """sha256 of the context's files (names and bytes), 12 hex digits."""
    digest = hashlib.sha256()
    for path in sorted(p for p in context.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(context)).encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:12]


def dockerfile(has_deps: bool, trains: bool) -> str:
    lines = [f"FROM {BASE_IMAGE}"]
    if has_deps:
        lines += ["COPY deps/ /opt/lukewarm/deps/", "ENV PYTHONPATH=/opt/lukewarm/deps"]
    lines += ["COPY app/ /app/", "WORKDIR /app"]
    if trains:
        lines += ["RUN python3 train.py"]
    # Bytecode compiled once, in the image (after training, which may write code): the replica's file
    # system is read-only and it runs with PYTHONDONTWRITEBYTECODE, so without this every start
    # compiles every module it imports again (numpy alone: 80-135 ms of each cold or stopped start).
    # Hash-based .pyc carry no build time. A file that does not compile (packages ship some) is only
    # left uncompiled: this is a speed-up, never a reason to fail the build.
    compiled = "/opt/lukewarm/deps /app" if has_deps else "/app"
    lines += [f"RUN python3 -m compileall -q -j 0 --invalidation-mode unchecked-hash {compiled} >/dev/null || true"]
    return "\n".join(lines) + "\n"


def prepare_context(model_dir: Path, work: Path) -> Path:
    """A build context in ``work`` for ``model_dir`` (which has no Dockerfile): app/, deps/, a Dockerfile."""
    if not (model_dir / "main.py").exists() and not any(model_dir.glob("*.py")):
        raise BuildError(f"{model_dir} holds no Python module to serve (lukewarm init makes one)")
    context = work / "context"
    shutil.copytree(model_dir, context / "app", ignore=shutil.ignore_patterns(*IGNORED), symlinks=False)
    requirements = model_dir / "requirements.txt"
    has_deps = requirements.exists() and any(
        line.strip() and not line.strip().startswith("#") for line in requirements.read_text().splitlines())
    if has_deps:
        install_requirements(requirements, context / "deps")
    (context / "Dockerfile").write_text(dockerfile(has_deps, (model_dir / "train.py").exists()))
    return context


def build_model(model_dir: str, repository: str, say: object = None) -> str:
    """Build ``model_dir`` as ``repository:<content tag>`` (its own Dockerfile when it has one); the tag built."""
    from runtime_proxy.docker_runtime import build_image

    source = Path(model_dir)
    if not source.is_dir():
        raise BuildError(f"{model_dir} is not a directory")
    with tempfile.TemporaryDirectory(prefix="lwbuild-") as work:
        if (source / "Dockerfile").exists():
            context = source
        else:
            if (source / "requirements.txt").exists() and callable(say):
                say(f"installing {source / 'requirements.txt'} from the wheelhouse {wheelhouse_dir()} …\n")
            context = prepare_context(source, Path(work))
        tag = f"{repository}:{content_tag(context)}"
        if callable(say):
            say(f"building {tag} …\n")
        build_image(str(context), tag)
    return tag


def init(directory: str, name: str) -> list[str]:
    """Scaffold a model in ``directory`` (created; existing files are kept): the files written."""
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for filename, text in (("main.py", INIT_MAIN), ("requirements.txt", "# one requirement per line, e.g.\n# scikit-learn==1.5.2\n"),
                           ("README.md", INIT_README.format(name=name))):
        path = target / filename
        if not path.exists():
            path.write_text(text)
            written.append(str(path))
    return written
