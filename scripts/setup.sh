#!/usr/bin/env bash
# Fresh-machine set-up shared by `make run` and `make test`. Idempotent: every
# step checks first and only acts on what is missing or not answering.
# LUKEWARM_SKIP_DOCKER=1 skips dockerd and the base image (laptops without Docker).
set -euo pipefail

cd "$(dirname "$0")/.."
# dockerd and debootstrap live in sbin, which non-login root shells may lack.
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

SKIP_DOCKER="${LUKEWARM_SKIP_DOCKER:-0}"
REDIS_PORT=6379
REDIS_LOG=/tmp/lukewarm-redis.log
DOCKERD_LOG=/tmp/lukewarm-dockerd.log
STAMP=.venv/.lukewarm-installed

step() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }
is_root() { [ "$(id -u)" -eq 0 ]; }

# wait_for SECONDS CMD...: poll CMD until it succeeds; fail after SECONDS.
wait_for() {
    local deadline=$((SECONDS + $1)); shift
    until "$@" >/dev/null 2>&1; do
        [ "$SECONDS" -lt "$deadline" ] || return 1
        sleep 0.5
    done
}

redis_up() { [ "$(timeout 5 redis-cli -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ]; }
docker_up() { timeout 10 docker info >/dev/null 2>&1; }

# --- system packages ---------------------------------------------------------
# Check for dockerd, not docker: some images ship the client without the daemon.
# redis-sentinel and docker-registry serve the fault tests (failover, pulls by digest); chromium the
# status page's browser test (Playwright drives Debian's chromium: no browser download); systemd-analyze
# verifies the units in deploy/.
need=(redis-server redis-sentinel chromium systemd-analyze)
[ "$SKIP_DOCKER" = 1 ] || need+=(dockerd debootstrap docker-registry)
missing=()
for cmd in "${need[@]}"; do
    command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
done
# Debian splits venv support out of python3; without it `python3 -m venv` fails.
if [ ! -x .venv/bin/python ] && ! python3 -c 'import ensurepip' >/dev/null 2>&1; then
    missing+=(python3-venv)
fi
if [ "${#missing[@]}" -gt 0 ]; then
    is_root || die "missing ${missing[*]}; as root: apt-get install redis-server redis-sentinel chromium systemd docker.io debootstrap docker-registry python3-venv"
    pkgs=(redis-server redis-sentinel chromium systemd)
    [ "$SKIP_DOCKER" = 1 ] || pkgs+=(docker.io debootstrap docker-registry)
    [[ " ${missing[*]} " == *" python3-venv "* ]] && pkgs+=(python3-venv)
    step "installing ${pkgs[*]} (missing: ${missing[*]})"
    export DEBIAN_FRONTEND=noninteractive
    timeout 300 apt-get update -qq || die "apt-get update failed"
    timeout 900 apt-get install -y -qq "${pkgs[@]}" >/dev/null || die "apt-get install ${pkgs[*]} failed"
else
    step "system packages present"
fi

# --- virtualenv ----------------------------------------------------------------
if [ ! -x .venv/bin/python ]; then
    step "creating .venv"
    python3 -m venv .venv || die "python3 -m venv .venv failed"
fi
if [ "$STAMP" -nt pyproject.toml ]; then
    step ".venv up to date"
else
    step "installing lukewarm into .venv"
    timeout 900 .venv/bin/pip install -q -e '.[test]' || die "pip install -e '.[test]' failed"
    touch "$STAMP"
fi

# --- redis ---------------------------------------------------------------------
if redis_up; then
    step "redis answering on :$REDIS_PORT"
else
    step "starting redis-server on :$REDIS_PORT"
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --daemonize yes --save '' \
        --appendonly no --logfile "$REDIS_LOG" || die "redis-server failed to start (see $REDIS_LOG)"
    wait_for 30 redis_up || die "redis not answering after 30 s: $(tail -n 1 "$REDIS_LOG" 2>/dev/null)"
fi

if [ "$SKIP_DOCKER" = 1 ]; then
    step "LUKEWARM_SKIP_DOCKER=1: skipping dockerd and the base image"
    exit 0
fi

# --- dockerd -------------------------------------------------------------------
if docker_up; then
    step "docker answering"
else
    is_root || die "docker not answering and starting dockerd needs root (sudo dockerd, or join the docker group)"
    step "starting dockerd (log: $DOCKERD_LOG)"
    # Own session: a Ctrl-C on `make run` must not take the daemon down with it.
    setsid nohup dockerd >"$DOCKERD_LOG" 2>&1 </dev/null &
    if ! wait_for 60 docker_up; then
        tail -n 5 "$DOCKERD_LOG" >&2 2>/dev/null || true
        die "dockerd not answering after 60 s (log: $DOCKERD_LOG)"
    fi
fi

# --- base image ----------------------------------------------------------------
# Through the module, not the `lukewarm` console script, so set-up does not
# depend on the whole CLI importing cleanly. It prints its own one-line error.
exec .venv/bin/python -m shared.baseimage
