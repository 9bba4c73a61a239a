#!/bin/sh
# Fill build/wheelhouse/ with the wheels the ingress image needs, for the base image's Python and platform.
#
#   scripts/wheelhouse.sh            # then: docker build .
#
# The Dockerfile builds offline (no pip, no network in the build): it unpacks these wheels. This script is
# the one step that needs an index (PyPI, or PIP_INDEX_URL / pip.conf), run on the host beforehand.
#
# What goes in: the dependencies of pyproject.toml minus those only the runtime proxy imports
# (PROXY_ONLY below) and what they need, binary wheels only (--only-binary=:all:), for the base image's
# CPython, CPU and glibc. Those are asked of the image itself (docker run --network none), or given as
# WHEELHOUSE_PYTHON=3.11.2 WHEELHOUSE_ARCH=x86_64 WHEELHOUSE_GLIBC=2.36 when no Docker engine answers.
# pip evaluates requirement markers (`async-timeout; python_full_version < "3.11.3"`) for the interpreter
# it runs in, not the target: it runs here with the target's marker environment in place of its own.
#
# Pins: with a .venv (make setup) versions are pinned to what is installed there, so the image runs what
# the test suite ran; WHEELHOUSE_CONSTRAINTS=<file> pins to a file instead, =none pins nothing.
#
# Idempotent: a wheelhouse filled from the same inputs (requirements, pins, target) is reused without
# touching the network; otherwise a fresh one is downloaded next to it and swapped in whole, so an
# interrupted run never leaves a half-filled wheelhouse. Bounded: WHEELHOUSE_TIMEOUT_S (600) for the
# download, 30 s per connection. Exits 75 when pip cannot get the wheels (its message above: no index
# reachable, no fitting wheel), 1 for anything else.
set -eu

ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${WHEELHOUSE_DIR:-$ROOT/build/wheelhouse}
BASE_IMAGE=${BASE_IMAGE:-lukewarm/python:bookworm}
TIMEOUT_S=${WHEELHOUSE_TIMEOUT_S:-600}
# Imported only by runtime_proxy/ (the Docker SDK, NVML): not in the ingress image.
PROXY_ONLY="docker nvidia-ml-py"

if [ -n "${PYTHON:-}" ]; then
    :
elif [ -x "$ROOT/.venv/bin/python" ]; then
    PYTHON=$ROOT/.venv/bin/python
else
    PYTHON=python3
fi

fail() { echo "wheelhouse: $*" >&2; exit 1; }

"$PYTHON" -m pip --version >/dev/null 2>&1 || fail "$PYTHON has no pip (set PYTHON= to one that has)"

# The target: what packaging.markers.default_environment() answers in the base image, plus its glibc.
if [ -n "${WHEELHOUSE_PYTHON:-}" ] && [ -n "${WHEELHOUSE_ARCH:-}" ] && [ -n "${WHEELHOUSE_GLIBC:-}" ]; then
    target=$("$PYTHON" -c '
import json, sys
v, m, g = sys.argv[1:]
print(json.dumps({"implementation_name": "cpython", "implementation_version": v, "os_name": "posix",
    "platform_machine": m, "platform_release": "", "platform_system": "Linux", "platform_version": "",
    "python_full_version": v, "platform_python_implementation": "CPython",
    "python_version": ".".join(v.split(".")[:2]), "sys_platform": "linux", "glibc": g}))' \
        "$WHEELHOUSE_PYTHON" "$WHEELHOUSE_ARCH" "$WHEELHOUSE_GLIBC")
else
    command -v docker >/dev/null 2>&1 \
        || fail "no docker client: set WHEELHOUSE_PYTHON (e.g. 3.11.2), WHEELHOUSE_ARCH and WHEELHOUSE_GLIBC"
    target=$(timeout 60 docker run --rm --network none --entrypoint python3 "$BASE_IMAGE" -c '
import json, os, platform, sys
i = sys.implementation.version
iver = "%d.%d.%d" % (i.major, i.minor, i.micro)
if i.releaselevel != "final":
    iver += i.releaselevel[0] + str(i.serial)
print(json.dumps({"implementation_name": sys.implementation.name, "implementation_version": iver,
    "os_name": os.name, "platform_machine": platform.machine(), "platform_release": platform.release(),
    "platform_system": platform.system(), "platform_version": platform.version(),
    "python_full_version": platform.python_version(),
    "platform_python_implementation": platform.python_implementation(),
    "python_version": ".".join(platform.python_version_tuple()[:2]), "sys_platform": sys.platform,
    "glibc": platform.libc_ver()[1]}))') \
        || fail "cannot ask $BASE_IMAGE for its Python (build it: lukewarm image build-base)"
fi
# shellcheck disable=SC2046
set -- $(printf '%s' "$target" | "$PYTHON" -c '
import json, sys
t = json.load(sys.stdin)
# The kernel (platform_release/version) of whichever host asked: no reason to download again.
key = ",".join(f"{k}={v}" for k, v in sorted(t.items()) if k not in ("platform_release", "platform_version"))
print(t["python_full_version"], t["platform_machine"], t["glibc"], key.replace(" ", "_"))')
py_full=$1 arch=$2 glibc=$3 target_key=$4
case "$py_full" in 3.[0-9]*) ;; *) fail "unexpected Python version '$py_full' in $BASE_IMAGE" ;; esac
abi=cp$(echo "$py_full" | cut -d. -f1,2 | tr -d .)
glibc_minor=${glibc#2.}
case "$glibc_minor" in ''|*[!0-9]*) fail "unexpected glibc version '$glibc' in $BASE_IMAGE" ;; esac

# Every manylinux tag that glibc runs (pip does not expand manylinux_2_X on its own).
platforms=""
minor=$glibc_minor
while [ "$minor" -ge 17 ]; do
    platforms="$platforms --platform manylinux_2_${minor}_${arch}"
    minor=$((minor - 1))
done
platforms="$platforms --platform manylinux2014_${arch}"  # pip adds manylinux2010 and manylinux1

mkdir -p "$(dirname "$OUT")"
work=$(mktemp -d "$(dirname "$OUT")/.wheelhouse.XXXXXX")
trap 'rm -rf "$work"' EXIT
trap 'exit 130' INT TERM

# Requirements: pyproject's dependencies, less the proxy's own.
"$PYTHON" - "$ROOT/pyproject.toml" "$PROXY_ONLY" >"$work/requirements.in" <<'PY'
import re, sys, tomllib
def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()
skip = {norm(name) for name in sys.argv[2].split()}
with open(sys.argv[1], "rb") as f:
    deps = tomllib.load(f)["project"]["dependencies"]
for dep in deps:
    if norm(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", dep).group(1)) not in skip:
        print(dep)
PY

# Pins.
constraints=${WHEELHOUSE_CONSTRAINTS:-}
if [ "$constraints" = none ]; then
    : >"$work/constraints.txt"
elif [ -n "$constraints" ]; then
    cp "$constraints" "$work/constraints.txt"
elif [ -x "$ROOT/.venv/bin/python" ]; then
    "$ROOT/.venv/bin/python" -m pip freeze --exclude-editable --disable-pip-version-check 2>/dev/null \
        | grep -E '^[A-Za-z0-9][A-Za-z0-9._-]*==' >"$work/constraints.txt" || :
else
    : >"$work/constraints.txt"
fi

stamp=$( { printf '%s\n' "$target_key"; cat "$work/requirements.in" "$work/constraints.txt"; } | sha256sum | cut -d' ' -f1)

exec 9>"$(dirname "$OUT")/.wheelhouse.lock"
flock -w "$TIMEOUT_S" 9 || fail "another wheelhouse.sh holds $(dirname "$OUT")/.wheelhouse.lock"

if [ -f "$OUT/.stamp" ] && [ "$(cat "$OUT/.stamp")" = "$stamp" ] && ls "$OUT"/*.whl >/dev/null 2>&1; then
    echo "wheelhouse: $OUT is up to date ($(ls "$OUT"/*.whl | wc -l) wheels for CPython $py_full $arch glibc $glibc)"
    exit 0
fi

echo "wheelhouse: downloading wheels for CPython $py_full, $arch, glibc $glibc into $OUT"
mkdir "$work/wheels"
printf '%s\n' "$target" >"$work/target.json"
cat >"$work/pip_for_target.py" <<'PY'
"""pip, with the target's requirement-marker environment in place of this interpreter's."""
import json, sys
from pip._vendor.packaging import markers
target = json.load(open(sys.argv.pop(1)))
del target["glibc"]
if not callable(getattr(markers, "default_environment", None)):
    sys.exit("wheelhouse: this pip has no packaging.markers.default_environment to point at the target")
markers.default_environment = lambda: dict(target)
from pip._internal.cli.main import main
sys.exit(main())
PY
# shellcheck disable=SC2086
if ! timeout "$TIMEOUT_S" "$PYTHON" "$work/pip_for_target.py" "$work/target.json" download \
        --disable-pip-version-check --no-input --timeout 30 --retries 2 \
        --dest "$work/wheels" --only-binary=:all: \
        --python-version "$py_full" --implementation cp --abi "$abi" $platforms \
        -r "$work/requirements.in" -c "$work/constraints.txt" >&2; then
    echo "wheelhouse: pip download failed or took longer than ${TIMEOUT_S}s (is the index reachable?)" >&2
    exit 75
fi

ls "$work/wheels"/*.whl >/dev/null 2>&1 || fail "pip downloaded no wheels"
( cd "$work/wheels" && ls -- *.whl | sed 's/-[^-]*-[^-]*-[^-]*\.whl$//; s/-/==/' >requirements.txt )
cp "$work/requirements.in" "$work/constraints.txt" "$work/target.json" "$work/wheels/"
echo "$stamp" >"$work/wheels/.stamp"

# Swap in whole (the old one goes with $work).
if [ -e "$OUT" ]; then
    mv "$OUT" "$work/old"
fi
mv "$work/wheels" "$OUT"
echo "wheelhouse: $(ls "$OUT"/*.whl | wc -l) wheels in $OUT"
