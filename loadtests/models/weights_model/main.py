"""A model with real weights: importing this module reads them all into memory (a few hundred MB,
made at build time by ``train.py``), as loading a checkpoint does; ``predict`` uses them (cheaply).

``predict({"row": i})`` → ``{"row", "value", "load_id", "load"}``: ``value`` is row ``i`` dotted with
itself; ``load_id`` is new on every import, so a caller can tell a thawed process (same id) from a
restarted one; ``load`` is what this import cost, timed here: ``boot_ms`` (the process's age when the
import began: interpreter and harness start-up, 10 ms resolution), ``import_ms`` (numpy), ``read_ms``
(the weights into memory), ``check_ms`` (a sample checked against the build's) and ``total_ms``.
"""
import json
import os
import time
import uuid

_t0 = time.perf_counter()


def _process_age_ms():
    """How long ago this process started (from /proc; clock ticks, so 10 ms resolution)."""
    try:
        with open("/proc/self/stat", "rb") as f:
            started_ticks = int(f.read().rsplit(b")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime_s = float(f.read().split()[0])
        return max(0.0, (uptime_s - started_ticks / os.sysconf("SC_CLK_TCK")) * 1000)
    except (OSError, ValueError, IndexError):
        return float("nan")


_boot_ms = _process_age_ms()

import weights  # after the clock above: its own cost is part of the load

MB, LOADER = weights.config()
with open(os.path.join(weights.HERE, "expected.json")) as _expected:
    EXPECTED = json.load(_expected)

if LOADER == "numpy":
    _t = time.perf_counter()
    import numpy as np

    _import_ms = (time.perf_counter() - _t) * 1000
    _t = time.perf_counter()
    W = np.load(weights.path_for(LOADER))  # read in full (no mmap): every page is in memory now
    _read_ms = (time.perf_counter() - _t) * 1000
    _t = time.perf_counter()
    _sample = float(np.asarray(W[::max(1, W.shape[0] // 64), :8], dtype=np.float64).sum())
    _ok = W.shape == (EXPECTED["rows"], EXPECTED["dim"]) and abs(_sample - EXPECTED["sample"]) < 1e-6
else:
    _import_ms = 0.0
    _t = time.perf_counter()
    W = bytearray(os.path.getsize(weights.path_for(LOADER)))
    with open(weights.path_for(LOADER), "rb", buffering=0) as _raw:
        _view, _done = memoryview(W), 0
        while _done < len(W):
            _n = _raw.readinto(_view[_done:])
            if not _n:
                break
            _done += _n
    _read_ms = (time.perf_counter() - _t) * 1000
    _t = time.perf_counter()
    _sample = float(sum(W[::4096]))
    _ok = len(W) == EXPECTED["bytes"] and _sample == EXPECTED["sample"]
_check_ms = (time.perf_counter() - _t) * 1000
if not _ok:
    raise RuntimeError(f"the weights do not match what the build wrote ({weights.path_for(LOADER)})")

LOAD_ID = uuid.uuid4().hex[:12]
LOAD = {"boot_ms": round(_boot_ms, 1), "import_ms": round(_import_ms, 3), "read_ms": round(_read_ms, 3),
        "check_ms": round(_check_ms, 3), "total_ms": round((time.perf_counter() - _t0) * 1000, 3),
        "bytes": EXPECTED["bytes"], "loader": LOADER}
ROWS = EXPECTED["rows"]
ROW_BYTES = EXPECTED["dim"] * 4


def predict(data):
    row = int(data.get("row", 0) if isinstance(data, dict) else data) % ROWS
    if LOADER == "numpy":
        value = float(W[row] @ W[row])
    else:
        value = float(sum(W[row * ROW_BYTES:(row + 1) * ROW_BYTES]))
    return {"row": row, "value": value, "load_id": LOAD_ID, "load": LOAD}
