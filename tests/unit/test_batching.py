"""Inference bodies: batch detection, parsing, splitting and stitching."""
from __future__ import annotations

from typing import Any

import pytest

from ingress.batching import chunk_ranges, is_batch, parse_body, plan_split, split_sizes, stitch
from shared.errors import ApiError


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ([[1, "a"]], True),
        ([[1, "a"], [2, "b"]], True),
        ([["id", {"x": 1}]], True),
        ([[1.5, [1, 2]]], True),
        ([["a", None]], True),
        ([[1, [[1, 2], [3, 4]]]], True),  # nested input is fine: only the id must be scalar
        ([[1, 2, 3]], False),
        ([[1]], False),
        ([[True, 1]], False),  # a bool id is not a scalar id
        ([[False, 1]], False),
        ([[None, 1]], False),
        ([[[1], 2]], False),
        ([[{"id": 1}, 2]], False),
        ([[1, "a"], "b"], False),
        ([[1, "a"], [2, "b", "c"]], False),
        ([(1, "a")], False),  # JSON never yields tuples; only lists count
        ([], False),
        ([1, 2], False),
        ("abc", False),
        ({"a": 1}, False),
        (None, False),
        (5, False),
    ],
)
def test_is_batch(data: Any, expected: bool) -> None:
    assert is_batch(data) is expected


@pytest.mark.parametrize(
    ("body", "inputs", "ids", "timeout_s"),
    [
        ({"data": 5}, [5], None, None),
        ({"data": None}, [None], None, None),
        ({"data": [1, 2]}, [[1, 2]], None, None),
        ({"data": []}, [[]], None, None),
        ({"data": [[1, "a"], ["x", "b"]]}, ["a", "b"], [1, "x"], None),
        ({"data": [[True, 1]]}, [[[True, 1]]], None, None),
        ({"data": 1, "timeout_seconds": 3}, [1], None, 3.0),
        ({"data": [[1, 2]], "timeout_seconds": 1}, [2], [1], 1.0),
        ({"data": 1, "timeout_seconds": None}, [1], None, None),
    ],
)
def test_parse_body_ok(body: Any, inputs: list[Any], ids: list[Any] | None, timeout_s: float | None) -> None:
    parsed = parse_body(body)
    assert parsed.inputs == inputs
    assert parsed.ids == ids
    assert parsed.timeout_s == timeout_s
    assert parsed.is_batch is (ids is not None)


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (None, "JSON object"),
        ([1, 2], "JSON object"),
        ("data", "JSON object"),
        ({}, '"data"'),
        ({"timeout_seconds": 3}, '"data"'),
        ({"data": 1, "extra": 2}, "extra"),
        ({"data": 1, "b": 1, "a": 2}, "a, b"),
        ({"data": 1, "timeout_seconds": 0}, "timeout_seconds"),
        ({"data": 1, "timeout_seconds": -5}, "timeout_seconds"),
        ({"data": 1, "timeout_seconds": 1.5}, "timeout_seconds"),
        ({"data": 1, "timeout_seconds": "10"}, "timeout_seconds"),
        ({"data": 1, "timeout_seconds": True}, "timeout_seconds"),
        ({"data": 1, "timeout_seconds": [1]}, "timeout_seconds"),
    ],
)
def test_parse_body_errors(body: Any, words: str) -> None:
    with pytest.raises(ApiError) as info:
        parse_body(body)
    assert info.value.status == 400
    assert info.value.type == "bad_request"
    assert words in info.value.message


@pytest.mark.parametrize(
    ("total", "weights", "min_chunk", "expected"),
    [
        (10, [1, 1], 1, [5, 5]),
        (10, [3, 1], 1, [8, 2]),  # 7.5/2.5: remainder to the larger fraction, ties to the first
        (9, [1, 1, 1], 1, [3, 3, 3]),
        (10, [1, 1, 1], 1, [4, 3, 3]),
        (2, [1, 1, 1, 1], 1, [1, 1]),  # never an empty chunk
        (1, [5, 5], 1, [1]),
        (100, [1, 1, 1, 1], 30, [34, 33, 33]),  # only 3 chunks of >= 30 fit in 100
        (10, [1, 1], 20, [10]),
        (10, [0, 0], 1, [5, 5]),  # zero weights are treated as equal tiny ones
        (0, [1, 1], 1, []),
        (-3, [1], 1, []),
        (5, [], 1, []),
    ],
)
def test_split_sizes_table(total: int, weights: list[float], min_chunk: int, expected: list[int]) -> None:
    assert split_sizes(total, weights, min_chunk) == expected


@pytest.mark.parametrize("total", [1, 2, 7, 31, 100, 1001])
@pytest.mark.parametrize("weights", [[1], [1, 1], [5, 1, 1], [0.1, 10, 3, 3], [1] * 8])
@pytest.mark.parametrize("min_chunk", [1, 4, 32])
def test_split_sizes_invariants(total: int, weights: list[float], min_chunk: int) -> None:
    sizes = split_sizes(total, weights, min_chunk)
    assert sum(sizes) == total
    assert all(s > 0 for s in sizes)
    assert len(sizes) <= len(weights)
    assert len(sizes) <= max(1, total // min_chunk)


@pytest.mark.parametrize(("total", "weights"), [(1000, [1, 2, 3, 4]), (997, [10, 1]), (500, [1, 1, 1])])
def test_split_sizes_proportional(total: int, weights: list[float]) -> None:
    sizes = split_sizes(total, weights)
    for size, w in zip(sizes, weights, strict=True):
        assert abs(size - total * w / sum(weights)) < 1


def test_split_sizes_no_chunk_below_min_chunk() -> None:
    sizes = split_sizes(10, [9, 1], min_chunk=3)
    assert sum(sizes) == 10
    assert all(s >= 3 for s in sizes), sizes


@pytest.mark.parametrize(
    ("sizes", "expected"),
    [
        ([], []),
        ([3], [(0, 3)]),
        ([3, 2, 5], [(0, 3), (3, 5), (5, 10)]),
        ([1, 1], [(0, 1), (1, 2)]),
    ],
)
def test_chunk_ranges(sizes: list[int], expected: list[tuple[int, int]]) -> None:
    assert chunk_ranges(sizes) == expected


@pytest.mark.parametrize(
    ("total", "start_ms", "per_item_ms", "min_chunk", "expected"),
    [
        (100, [0, 0], 1.0, 1, [50, 50]),
        (99, [0, 0, 0], 1.0, 1, [33, 33, 33]),
        (100, [0, 5000], 1.0, 1, [100, 0]),  # a cold candidate with a huge start gets nothing
        (100, [5000, 0], 1.0, 1, [0, 100]),  # order of the answer follows start_ms, not rank
        (100, [0, 0, 5000], 1.0, 1, [50, 50, 0]),
        # warm ones take more so all finish together: T = (100 + 20) / 2 = 60 → 60 and 40
        (100, [0, 20], 1.0, 1, [60, 40]),
        (5, [0], 1.0, 1, [5]),
        (0, [0, 0], 1.0, 1, []),
        (10, [], 1.0, 1, []),
        (100, [0, 0, 0, 0], 1.0, 40, [50, 50, 0, 0]),  # only two chunks of >= 40 fit
    ],
)
def test_plan_split_table(total: int, start_ms: list[float], per_item_ms: float, min_chunk: int,
                          expected: list[int]) -> None:
    assert plan_split(total, start_ms, per_item_ms, min_chunk) == expected


@pytest.mark.parametrize("total", [1, 10, 64, 257, 1000])
@pytest.mark.parametrize(
    "start_ms", [[0.0], [0.0, 0.0], [0.0, 25.0, 400.0], [400.0, 25.0, 0.0], [5.0, 5.0, 5.0, 5.0], [1e6, 0.0]],
)
@pytest.mark.parametrize("per_item_ms", [0.0, 0.5, 5.0])
def test_plan_split_invariants(total: int, start_ms: list[float], per_item_ms: float) -> None:
    sizes = plan_split(total, start_ms, per_item_ms)
    assert len(sizes) == len(start_ms)
    assert sum(sizes) == total
    assert all(s >= 0 for s in sizes)
    best = min(range(len(start_ms)), key=lambda i: start_ms[i])
    assert sizes[best] == max(sizes)  # the cheapest start never gets less than another


def test_plan_split_equal_starts_give_equal_sizes() -> None:
    sizes = plan_split(120, [7.0] * 4, 2.0)
    assert sizes == [30, 30, 30, 30]


def test_plan_split_warm_first_order_preserved() -> None:
    # warm, lukewarm, cold as the router orders them: sizes non-increasing
    sizes = plan_split(1000, [0.0, 25.0, 400.0], 1.0)
    assert sizes[0] >= sizes[1] >= sizes[2]
    assert sum(sizes) == 1000


def test_plan_split_tiny_share_does_not_shift_onto_wrong_candidate() -> None:
    # T = (10 + 9.5) / 2 = 9.75: weights [0.25, 9.75] → the lukewarm one rounds to 0 items.
    assert plan_split(10, [9.5, 0.0], 1.0) == [0, 10]


def test_plan_split_folds_chunks_below_min_chunk() -> None:
    sizes = plan_split(100, [0.0, 90.0], 1.0, min_chunk=32)
    assert sum(sizes) == 100
    assert all(s == 0 or s >= 32 for s in sizes), sizes


@pytest.mark.parametrize(
    ("ids", "outputs", "expected"),
    [
        (None, ["out"], "out"),
        (None, [{"a": 1}], {"a": 1}),
        ([3, 1, 2], ["c", "a", "b"], [[3, "c"], [1, "a"], [2, "b"]]),
        (["x"], [None], [["x", None]]),
        ([], [], []),
    ],
)
def test_stitch(ids: list[Any] | None, outputs: list[Any], expected: Any) -> None:
    assert stitch(ids, outputs) == expected


@pytest.mark.parametrize(("ids", "outputs"), [([1, 2], ["a"]), ([1], ["a", "b"])])
def test_stitch_is_strict_about_length(ids: list[Any], outputs: list[Any]) -> None:
    with pytest.raises(ValueError):
        stitch(ids, outputs)


def test_parse_then_split_then_stitch_round_trip() -> None:
    body = {"data": [[i, i * 10] for i in range(100, 0, -1)]}
    parsed = parse_body(body)
    sizes = plan_split(len(parsed.inputs), [0.0, 0.0, 30.0], 1.0)
    outputs: list[Any] = []
    for a, b in chunk_ranges([s for s in sizes if s]):
        outputs.extend(x + 1 for x in parsed.inputs[a:b])
    assert stitch(parsed.ids, outputs) == [[i, i * 10 + 1] for i in range(100, 0, -1)]
