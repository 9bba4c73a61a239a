"""``python -m ingress``: one ingress process (what deploy/lukewarm-ingress.service runs)."""
from __future__ import annotations

import logging
import sys

from ingress.app import build_app
from shared import serving
from shared.eventloop import install_uvloop
from shared.settings import IngressSettings, load_settings


def main(argv: list[str] | None = None) -> None:
    settings = load_settings(IngressSettings, sys.argv[1:] if argv is None else argv, prog="python -m ingress")
    if not settings.admin_token:
        raise SystemExit("LUKEWARM_ADMIN_TOKEN must be set (lukewarm dev generates one)")
    # Before anything starts: a bad certificate or key is a one-line exit, not a half-started daemon.
    listener = serving.ingress_listener(settings)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    install_uvloop()
    serving.run(build_app(settings), listener, access_log=None, shutdown_timeout_s=settings.drain_timeout_s)


if __name__ == "__main__":
    main()
