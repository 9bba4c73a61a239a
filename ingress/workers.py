"""``python -m ingress --workers N``: N ingress processes on one port (SO_REUSEPORT), as gunicorn users expect.

Each worker is a whole ingress (``python -m ingress`` with ``LUKEWARM_WORKERS=1``): its own view, event
subscription and connections; the kernel spreads new connections over them. This supervisor only
starts them, forwards SIGTERM/SIGINT (each worker drains as a single ingress does), and starts a new one
when one dies — at most ``MAX_RESTARTS`` within ``RESTART_WINDOW_S``, after which it stops them all and
exits non-zero rather than crash-loop. Counters of ``/metrics`` are per worker (a scrape reaches one).
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

log = logging.getLogger("lukewarm.ingress")

MAX_RESTARTS = 5
RESTART_WINDOW_S = 60.0
POLL_S = 0.2


def worker_command(argv: Sequence[str]) -> list[str]:
    """The command of one worker: the same flags, one worker."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--workers":
            skip = True
            continue
        if arg.startswith("--workers="):
            continue
        kept.append(arg)
    return [sys.executable, "-m", "ingress", *kept]


def supervise(count: int, argv: Sequence[str], drain_timeout_s: float,
              spawn: Callable[[list[str], dict[str, str]], subprocess.Popen[bytes]] | None = None) -> int:
    """Run ``count`` workers until a signal (then drain them) or too many deaths; the exit status."""
    start = spawn or (lambda cmd, env: subprocess.Popen(cmd, env=env))
    env = {**os.environ, "LUKEWARM_WORKERS": "1", "LUKEWARM_REUSE_PORT": "1"}
    command = worker_command(argv)
    stopping: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        stopping.append(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    workers = [start(command, env) for _ in range(count)]
    log.info("ingress: %d workers (pids %s)", count, ", ".join(str(w.pid) for w in workers))
    deaths: list[float] = []
    status = 0
    while not stopping:
        for n, worker in enumerate(workers):
            code = worker.poll()
            if code is None:
                continue
            now = time.monotonic()
            deaths = [t for t in deaths if now - t < RESTART_WINDOW_S] + [now]
            if len(deaths) > MAX_RESTARTS:
                log.error("ingress: workers keep dying (%d in %.0f s): stopping", len(deaths), RESTART_WINDOW_S)
                stopping.append(signal.SIGTERM)
                status = 1
                break
            log.warning("ingress: worker %d exited with %s: starting another", worker.pid, code)
            workers[n] = start(command, env)
        time.sleep(POLL_S)  # the supervisor's poll of its children (it has nothing else to do)
    for worker in workers:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + drain_timeout_s + 10
    for worker in workers:
        try:
            code = worker.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            worker.kill()
            code = worker.wait(timeout=10)
        status = status or (code if code not in (0, -signal.SIGTERM) else 0)
    return status
