"""``python -m runtime_proxy``: one runtime proxy daemon (what deploy/lukewarm-proxy.service runs)."""
from __future__ import annotations

import sys

from shared.hugeheap import exec_on_huge_heap

if __name__ == "__main__":
    exec_on_huge_heap()  # first: the process may start again (shared/hugeheap.py), before the imports below

from aiohttp.log import access_logger

from runtime_proxy.daemon import build_app
from shared import logs, serving
from shared.eventloop import install_uvloop
from shared.settings import ProxySettings, finish_proxy_settings, load_settings


def main(argv: list[str] | None = None) -> None:
    settings = finish_proxy_settings(
        load_settings(ProxySettings, sys.argv[1:] if argv is None else argv, prog="python -m runtime_proxy")
    )
    logs.setup(settings.log_level, settings.log_format)
    install_uvloop()
    # A chunk whose ingress hung up (a hedge lost, a request failed) is cancelled: see runtime_proxy/ledger.py.
    serving.run(build_app(settings), serving.proxy_listener(settings), access_log=access_logger,
                shutdown_timeout_s=settings.drain_timeout_s, handler_cancellation=True)


if __name__ == "__main__":
    main()
