"""``python -m ingress``: one ingress process (what deploy/lukewarm-ingress.service runs)."""
from __future__ import annotations

import logging
import sys

from aiohttp import web

from ingress.app import build_app
from shared.eventloop import install_uvloop
from shared.settings import IngressSettings, load_settings


def main(argv: list[str] | None = None) -> None:
    settings = load_settings(IngressSettings, sys.argv[1:] if argv is None else argv, prog="python -m ingress")
    if not settings.admin_token:
        raise SystemExit("LUKEWARM_ADMIN_TOKEN must be set (lukewarm dev generates one)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    install_uvloop()
    web.run_app(build_app(settings), host=settings.ingress_host, port=settings.ingress_port,
                shutdown_timeout=30, print=None, access_log=None)


if __name__ == "__main__":
    main()
