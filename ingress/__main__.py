"""``python -m ingress``: one ingress process (what deploy/lukewarm-ingress.service runs)."""
from __future__ import annotations

import sys

from shared.hugeheap import exec_on_huge_heap

if __name__ == "__main__":
    exec_on_huge_heap()  # first: the process may start again (shared/hugeheap.py), before the imports below

from aiohttp.log import access_logger

from ingress import workers
from ingress.app import build_app
from shared import logs, serving
from shared.eventloop import install_uvloop
from shared.settings import IngressSettings, load_settings


def main(argv: list[str] | None = None) -> None:
    settings = load_settings(IngressSettings, sys.argv[1:] if argv is None else argv, prog="python -m ingress")
    if not settings.admin_token:
        raise SystemExit("LUKEWARM_ADMIN_TOKEN must be set (lukewarm dev generates one)")
    # Before anything starts: a bad certificate or key is a one-line exit, not a half-started daemon.
    listener = serving.ingress_listener(settings)
    logs.setup(settings.log_level, settings.log_format)
    if settings.workers > 1:
        raise SystemExit(workers.supervise(settings.workers, sys.argv[1:] if argv is None else argv,
                                           settings.drain_timeout_s))
    install_uvloop()
    # The access log: every request with its status, time and X-Request-Id (shared/logs.py).
    serving.run(build_app(settings), listener, access_log=access_logger, shutdown_timeout_s=settings.drain_timeout_s,
                drain_grace_s=serving.DRAIN_GRACE_S)


if __name__ == "__main__":
    main()
