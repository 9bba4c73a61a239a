"""``python -m loadtests``: the last JSON line of each benchmark found, its headline figures picked."""
from __future__ import annotations

import pytest

from loadtests.__main__ import BENCHES, headline, last_json, main


def test_the_last_json_object_is_taken_and_noise_ignored() -> None:
    out = 'table\n{"bench": "x", "ratio": 0.9}\n'
    assert last_json(out) == {"bench": "x", "ratio": 0.9}
    assert last_json("no json here\n") is None
    assert last_json('{"a": 1}\n[1, 2]\n') is None  # the last JSON line is not an object


def test_headlines_show_ratios_and_the_chaos_keys() -> None:
    text = headline({"bench": "chaos", "sent": 10, "ok": 10, "lost": 0, "events": ["x"], "p99_ratio": 3.0})
    assert "sent=10" in text and "lost=0" in text and "p99_ratio=3.0" in text and "events" not in text


def test_every_benchmark_module_is_in_the_set_and_unknown_names_are_refused() -> None:
    import pkgutil

    import loadtests

    modules = {m.name for m in pkgutil.iter_modules(loadtests.__path__)} - {"common", "traffic", "redis_ha",
                                                                             "locustfile", "relay", "__main__"}
    assert modules == set(BENCHES)
    with pytest.raises(SystemExit):
        main(["--only", "nope"])
