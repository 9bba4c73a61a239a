"""Inference bodies: single or batch, how a batch is split, how it is stitched back."""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from shared.errors import TooLarge, bad_request


@dataclasses.dataclass(frozen=True)
class InferenceInput:
    """A parsed inference body: the inputs to run and how to shape the answer."""

    inputs: list[Any]
    ids: list[Any] | None  # None for a single input
    timeout_s: float | None

    @property
    def is_batch(self) -> bool:
        return self.ids is not None


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (str, int, float)) and not isinstance(value, bool)


def is_batch(data: Any) -> bool:
    """A list whose every item is a 2-item list with a scalar id is a batch."""
    return (
        isinstance(data, list) and len(data) > 0
        and all(isinstance(item, list) and len(item) == 2 and _is_scalar(item[0]) for item in data)
    )


def parse_body(body: Any, max_items: int = 100_000) -> InferenceInput:
    if not isinstance(body, dict):
        raise bad_request('body must be a JSON object like {"data": ...}')
    if "data" not in body:
        raise bad_request('body has no "data" field')
    unknown = set(body) - {"data", "timeout_seconds"}
    if unknown:
        raise bad_request(f"unknown field(s): {', '.join(sorted(unknown))}")
    timeout = body.get("timeout_seconds")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int) or timeout <= 0):
        raise bad_request("timeout_seconds must be a positive integer")
    data = body["data"]
    if isinstance(data, list) and len(data) > max_items:
        raise TooLarge(f"a request may hold at most {max_items} items, this one {len(data)}", "too_many_items")
    if is_batch(data):
        return InferenceInput(inputs=[item[1] for item in data], ids=[item[0] for item in data],
                              timeout_s=None if timeout is None else float(timeout))
    return InferenceInput(inputs=[data], ids=None, timeout_s=None if timeout is None else float(timeout))


def _apportion(total: int, weights: Sequence[float]) -> list[int]:
    """``total`` split proportionally to ``weights`` (aligned with them), largest remainders first."""
    w = [max(float(x), 1e-9) for x in weights]
    scale = total / sum(w)
    raw = [x * scale for x in w]
    sizes = [int(x) for x in raw]
    order = sorted(range(len(w)), key=lambda i: raw[i] - sizes[i], reverse=True)
    for i in order[: total - sum(sizes)]:
        sizes[i] += 1
    return sizes


def _fold_small(sizes: list[int], min_chunk: int) -> list[int]:
    """Move chunks below ``min_chunk`` into the largest chunk: a tiny chunk is not worth a hop."""
    out = list(sizes)
    largest = max(range(len(out)), key=lambda i: out[i])
    for i, size in enumerate(out):
        if i != largest and 0 < size < min_chunk:
            out[largest] += size
            out[i] = 0
    return out


def split_sizes(total: int, weights: Sequence[float], min_chunk: int = 1) -> list[int]:
    """Split ``total`` items into chunks proportional to the weights, largest remainders first.

    At most ``total // min_chunk`` weights are used and no chunk is smaller
    than ``min_chunk`` (unless there is only one). Sizes sum to ``total``;
    no chunk is empty.
    """
    if total <= 0 or not weights:
        return []
    usable = max(1, min(len(weights), total // max(1, min_chunk)))
    sizes = _fold_small(_apportion(total, weights[:usable]), min_chunk)
    return [s for s in sizes if s > 0]


def chunk_ranges(sizes: Sequence[int]) -> list[tuple[int, int]]:
    ranges, start = [], 0
    for size in sizes:
        ranges.append((start, start + size))
        start += size
    return ranges


def stitch(ids: list[Any] | None, outputs: list[Any]) -> Any:
    """The answer's ``data``: the one output, or ``[[id, output], …]`` in the request's order."""
    if ids is None:
        return outputs[0]
    return [[i, o] for i, o in zip(ids, outputs, strict=True)]


def plan_split(total: int, start_ms: Sequence[float], per_item_ms: float, min_chunk: int = 1) -> list[int]:
    """Chunk sizes that finish together: proxy i gets (T - start_i) / per_item items.

    ``start_ms`` is each candidate's expected wait before it can begin (0 when
    warm); the makespan T solves Σ max(0, T - s_i) / c = total. Candidates
    whose start cost exceeds T get nothing; chunks below ``min_chunk`` are
    folded into the largest. Sizes are aligned with ``start_ms``.
    """
    if total <= 0 or not start_ms:
        return []
    c = max(per_item_ms, 1e-6)
    order = sorted(range(len(start_ms)), key=lambda i: start_ms[i])
    makespan, used = 0.0, 1
    for k in range(1, len(order) + 1):
        chosen = [start_ms[i] for i in order[:k]]
        t = (total * c + sum(chosen)) / k
        if t < max(chosen):
            break
        makespan, used = t, k
    # At most total // min_chunk candidates can get a chunk worth its hop.
    used = max(1, min(used, total // max(1, min_chunk)))
    weights = [0.0] * len(start_ms)
    for i in order[:used]:
        weights[i] = max(makespan - start_ms[i], 1e-6)
    active = order[:used]
    sizes = _fold_small(_apportion(total, [weights[i] for i in active]), min_chunk)
    out = [0] * len(start_ms)
    for i, size in zip(active, sizes):
        out[i] = size
    return out
