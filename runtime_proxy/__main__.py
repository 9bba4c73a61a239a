"""``python -m runtime_proxy``: one runtime proxy daemon (what deploy/lukewarm-proxy.service runs)."""
from __future__ import annotations

import logging
import sys

from aiohttp import web

from runtime_proxy.daemon import build_app
from shared.eventloop import install_uvloop
from shared.settings import ProxySettings, finish_proxy_settings, load_settings


def main(argv: list[str] | None = None) -> None:
    settings = finish_proxy_settings(
        load_settings(ProxySettings, sys.argv[1:] if argv is None else argv, prog="python -m runtime_proxy")
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    install_uvloop()
    web.run_app(build_app(settings), host=settings.proxy_host, port=settings.proxy_port,
                shutdown_timeout=30, print=None)


if __name__ == "__main__":
    main()
