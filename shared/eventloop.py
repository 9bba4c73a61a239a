"""The event loop and the interpreter settings both daemons run with.

uvloop when available: +5-12 % on the HTTP hops (PERFORMANCE.md). ``settle_after_startup`` removes two
sources of event-loop stalls measured on a warm call (issue 13): full garbage collections that walk every
object the imports and the app's set-up made (20-40 ms each on a 2-vCPU host), and the loop waiting up to
the interpreter's 5 ms switch interval for the GIL while a worker thread (the Docker SDK parsing an
``inspect``, NVML) runs Python.
"""
from __future__ import annotations

import asyncio
import gc
import sys

# How long the loop's thread may wait for the GIL held by another thread (CPython's default is 5 ms).
SWITCH_INTERVAL_S = 0.0005
_settled = False


def install_uvloop() -> bool:
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


def settle_after_startup(switch_interval_s: float = SWITCH_INTERVAL_S) -> bool:
    """Once per process, after a daemon set itself up: collect once, then move every object that exists
    (modules, the app, its clients) out of the collector's reach (``gc.freeze``), so later collections
    walk only what requests made; and shorten the switch interval. Returns whether it ran now."""
    global _settled
    if _settled:
        return False
    _settled = True
    gc.collect()
    gc.freeze()
    sys.setswitchinterval(min(sys.getswitchinterval(), switch_interval_s))
    return True
