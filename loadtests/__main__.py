"""``python -m loadtests [--quick] [--only a,b]``: every benchmark of the project in one run, every ratio in one table.

Each benchmark runs as its own process (``python -m loadtests.<name>``, self-contained: it starts and
stops what it needs), one after another so they do not measure each other; its last line (one JSON
object) is collected. ``--quick`` runs each at a size that takes seconds, for a smoke check of the
whole set (the figures are then noisier). Prints a table of the headline figures and ratios, then as
the last line one JSON object ``{"bench": "all", "results": {<name>: <its object>}}``.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from typing import Any

import orjson

from loadtests.common import REPO_ROOT, log, report

# name → (arguments of a full run, arguments of a quick one)
BENCHES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "overhead": ((), ("--n", "200", "--seconds", "2", "--rounds", "2")),
    "starts": ((), ("--rounds", "2", "--warm-n", "20")),
    "model_starts": ((), ("--weights-mb", "50", "--rounds", "1", "--warm-n", "5")),
    "batch_scale": ((), ("--items", "200", "--reps", "1", "--proxies", "1,2")),
    "sim": ((), ("--requests", "5000")),
    "fleet_scale": ((), ("--sizes", "10,100", "--versions", "10000", "--seconds", "2", "--route-s", "0.2",
                         "--deploy-versions", "200")),
    "keepwarm": ((), ("--apps", "100", "--days", "3")),
    "slowloris": ((), ("--connections", "50", "--calls", "100", "--rounds", "1")),
    "scale": ((), ("--seconds", "4")),
    "chaos": ((), ("--seconds", "20", "--baseline-seconds", "5")),
}
# Headline figures per benchmark (DESIGN.md "Running it"), shown in the table when present.
HEADLINES = ("ratio", "speedup", "added_p50_ms", "added_p99_ms", "lukewarm_start_ms", "raw_unpause_ms",
             "start_fraction", "p99_ms", "lost", "sent", "ok", "vs_cold", "memory_s", "memory_ratio")
TIMEOUT_S = 1800.0


def last_json(text: str) -> dict[str, Any] | None:
    for line in reversed(text.strip().splitlines()):
        try:
            value = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        return value if isinstance(value, dict) else None
    return None


def headline(result: dict[str, Any]) -> str:
    parts = []
    for key, value in result.items():
        if any(word in key for word in HEADLINES) and not isinstance(value, list):
            parts.append(f"{key}={orjson.dumps(value).decode()}")
    return " ".join(parts)[:300]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtests", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: seconds per benchmark")
    parser.add_argument("--only", default="", help="comma-separated names (default: all)")
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or list(BENCHES)
    unknown = set(names) - set(BENCHES)
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {', '.join(sorted(unknown))}; known: {', '.join(BENCHES)}")
    results: dict[str, Any] = {}
    rows: list[list[Any]] = [["bench", "seconds", "figures"]]
    for name in names:
        full, quick = BENCHES[name]
        log(f"running loadtests.{name} {' '.join(quick if args.quick else full)}")
        started = time.monotonic()
        try:
            done = subprocess.run([sys.executable, "-m", f"loadtests.{name}", *(quick if args.quick else full)],
                                  cwd=REPO_ROOT, capture_output=True, text=True, timeout=TIMEOUT_S)
            result = last_json(done.stdout) if done.returncode == 0 else None
            if result is None:
                result = {"error": f"exit {done.returncode}: {(done.stderr or done.stdout).strip()[-300:]}"}
        except subprocess.TimeoutExpired:
            result = {"error": f"took longer than {TIMEOUT_S:.0f} s"}
        results[name] = result
        rows.append([name, round(time.monotonic() - started, 1), result.get("error") or headline(result)])
    report(rows, {"bench": "all", "quick": args.quick, "results": results})
    if any("error" in r for r in results.values()):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
