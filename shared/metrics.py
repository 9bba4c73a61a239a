"""Counters and latency sums in Prometheus text format; enough for /metrics without a dependency."""
from __future__ import annotations

import collections


class Metrics:
    def __init__(self) -> None:
        self.counters: collections.defaultdict[tuple[str, tuple[tuple[str, str], ...]], float] = \
            collections.defaultdict(float)
        self.sums: collections.defaultdict[tuple[str, tuple[tuple[str, str], ...]], float] = \
            collections.defaultdict(float)

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        self.counters[(name, tuple(sorted(labels.items())))] += value

    def observe(self, name: str, seconds: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        self.sums[(name + "_seconds_sum", key)] += seconds
        self.sums[(name + "_seconds_count", key)] += 1

    def render(self) -> str:
        lines = []
        for (name, labels), value in sorted({**self.counters, **self.sums}.items()):
            label_text = ",".join(f'{k}="{v}"' for k, v in labels)
            text = str(int(value)) if float(value).is_integer() else repr(float(value))
            lines.append(f"lukewarm_{name}{{{label_text}}} {text}" if label_text else f"lukewarm_{name} {text}")
        return "\n".join(lines) + "\n"
