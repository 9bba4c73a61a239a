"""Validation of client input and the JSON shapes between processes."""
from __future__ import annotations

import dataclasses

from typing import Any

import orjson
import pytest

from shared.errors import ApiError
from shared.messages import (
    AUTO_FALLBACK_IDLE_S, DEPLOY_FIELDS, PATCHABLE_FIELDS, Capacity, ChunkCall, ChunkRequest, ChunkResult, VersionSpec, check_alias, check_branch,
    check_name, split_version_key, validate_deploy, validate_settings,
)


def bad(call: Any, *args: Any) -> ApiError:
    with pytest.raises(ApiError) as info:
        call(*args)
    assert info.value.status == 400
    assert info.value.type == "bad_request"
    assert "\n" not in info.value.message
    return info.value


@pytest.mark.parametrize("value", ["acme", "a", "churn-model", "m_2", "0abc", "a" * 63])
def test_check_name_ok(value: str) -> None:
    assert check_name("model", value) == value


@pytest.mark.parametrize("value", ["", "Acme", "-acme", "_acme", "a" * 64, "a.b", "a/b", "a b", "é", None, 5, ["a"]])
def test_check_name_bad(value: Any) -> None:
    exc = bad(check_name, "model", value)
    assert exc.message.startswith("model must be")
    assert repr(value) in exc.message


@pytest.mark.parametrize("value", ["main", "staging", "feature/x", "Release-1.2", "a" * 100, "v1.0_rc"])
def test_check_branch_ok(value: str) -> None:
    assert check_branch(value) == value


@pytest.mark.parametrize("value", ["", "/main", ".hidden", "a..b", "../etc", "a~b", "a b", "a" * 101, None, 3])
def test_check_branch_bad(value: Any) -> None:
    assert "branch" in bad(check_branch, value).message


@pytest.mark.parametrize("value", ["harrys_version", "prod", "v2", "1a", "a" * 63])
def test_check_alias_ok(value: str) -> None:
    assert check_alias(value) == value


@pytest.mark.parametrize("value", ["latest", "46", "0", "", "Prod", "-x", "a" * 64, None, 46])
def test_check_alias_bad(value: Any) -> None:
    assert "alias" in bad(check_alias, value).message


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"image": "lukewarm/python:bookworm"}, {"image": "lukewarm/python:bookworm"}),
        ({"image": "img", "entrypoint": "pkg.mod:predict_fn"}, {"image": "img", "entrypoint": "pkg.mod:predict_fn"}),
        ({"image": "img", "entrypoint": None, "env": None}, {"image": "img"}),
        ({"image": "img", "env": {"A": "1", "_B2": ""}}, {"image": "img", "env": {"A": "1", "_B2": ""}}),
        ({"image": "img", "batch_size": 1, "memory_mb": 32, "gpu_memory_mb": 0},
         {"image": "img", "batch_size": 1, "memory_mb": 32, "gpu_memory_mb": 0}),
        ({"image": "img", "idle_timeout_s": 30, "timeout_s": 0.5},
         {"image": "img", "idle_timeout_s": 30.0, "idle_auto": False, "timeout_s": 0.5}),
        ({"image": "img", "idle_timeout_s": "auto"},
         {"image": "img", "idle_timeout_s": AUTO_FALLBACK_IDLE_S, "idle_auto": True}),
        ({"image": "img", "gpu": True, "keep_warm": False}, {"image": "img", "gpu": True, "keep_warm": False}),
        ({"image": "img", "capacity": {}}, {"image": "img", "capacity": Capacity(0, 1, 4)}),
        ({"image": "img", "capacity": {"min": 2}}, {"image": "img", "capacity": Capacity(2, 2, 4)}),
        ({"image": "img", "capacity": {"min": 6}}, {"image": "img", "capacity": Capacity(6, 6, 6)}),
        ({"image": "img", "capacity": {"desired": 10}}, {"image": "img", "capacity": Capacity(0, 10, 10)}),
        ({"image": "img", "capacity": {"min": 1, "desired": 2, "max": 3}}, {"image": "img", "capacity": Capacity(1, 2, 3)}),
    ],
)
def test_validate_deploy_ok(body: dict[str, Any], expected: dict[str, Any]) -> None:
    assert validate_deploy(body) == expected


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (None, "JSON object"),
        ([], "JSON object"),
        ({}, "image is required"),
        ({"entrypoint": "m:f"}, "image is required"),
        ({"image": "img", "colour": "red"}, "unknown field(s): colour"),
        ({"image": ""}, "image"),
        ({"image": None}, "image"),
        ({"image": "my image"}, "image"),
        ({"image": "x" * 301}, "image"),
        ({"image": 5}, "image"),
        ({"image": "img", "entrypoint": "main"}, "entrypoint"),
        ({"image": "img", "entrypoint": "main:"}, "entrypoint"),
        ({"image": "img", "entrypoint": "1main:f"}, "entrypoint"),
        ({"image": "img", "entrypoint": "main:f; rm -rf /"}, "entrypoint"),
        ({"image": "img", "env": ["A=1"]}, "env"),
        ({"image": "img", "env": {"A": 1}}, "env"),
        ({"image": "img", "env": {"1A": "x"}}, "env"),
        ({"image": "img", "env": {"A-B": "x"}}, "env"),
        ({"image": "img", "env": {"LUKEWARM_SECRET": "x"}}, "LUKEWARM_"),
        ({"image": "img", "batch_size": 0}, "batch_size"),
        ({"image": "img", "batch_size": 100_001}, "batch_size"),
        ({"image": "img", "batch_size": 2.5}, "batch_size"),
        ({"image": "img", "batch_size": True}, "batch_size"),
        ({"image": "img", "memory_mb": 31}, "memory_mb"),
        ({"image": "img", "memory_mb": "512"}, "memory_mb"),
        ({"image": "img", "gpu_memory_mb": -1}, "gpu_memory_mb"),
        ({"image": "img", "idle_timeout_s": 0}, "idle_timeout_s"),
        ({"image": "img", "idle_timeout_s": 7 * 86400 + 1}, "idle_timeout_s"),
        ({"image": "img", "idle_timeout_s": "AUTO"}, 'idle_timeout_s must be "auto"'),
        ({"image": "img", "idle_timeout_s": "30"}, 'idle_timeout_s must be "auto"'),
        ({"image": "img", "timeout_s": -1}, "timeout_s"),
        ({"image": "img", "timeout_s": 3601}, "timeout_s"),
        ({"image": "img", "timeout_s": True}, "timeout_s"),
        ({"image": "img", "timeout_s": float("inf")}, "timeout_s"),
        ({"image": "img", "timeout_s": float("nan")}, "timeout_s"),
        ({"image": "img", "gpu": "yes"}, "gpu"),
        ({"image": "img", "keep_warm": 1}, "keep_warm"),
        ({"image": "img", "capacity": 3}, "capacity"),
        ({"image": "img", "capacity": {"min": 1, "spare": 2}}, "capacity"),
        ({"image": "img", "capacity": {"min": -1}}, "min"),
        ({"image": "img", "capacity": {"max": "4"}}, "max"),
        ({"image": "img", "capacity": {"min": 1001}}, "min"),
        ({"image": "img", "capacity": {"max": 0}}, "min <= desired <= max"),
        ({"image": "img", "capacity": {"min": 3, "max": 2}}, "min <= desired <= max"),
        ({"image": "img", "capacity": {"min": 2, "desired": 1}}, "min <= desired <= max"),
        ({"image": "img", "capacity": {"min": 0, "desired": 0, "max": 0}}, "max >= 1"),
    ],
)
def test_validate_deploy_bad(body: Any, words: str) -> None:
    assert words in bad(validate_deploy, body).message


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({}, {}),
        ({"keep_warm": True}, {"keep_warm": True}),
        ({"idle_timeout_s": 60, "timeout_s": 10}, {"idle_timeout_s": 60.0, "idle_auto": False, "timeout_s": 10.0}),
        ({"idle_timeout_s": "auto"}, {"idle_timeout_s": AUTO_FALLBACK_IDLE_S, "idle_auto": True}),
        ({"capacity": {"min": 1, "desired": 1, "max": 2}}, {"capacity": Capacity(1, 1, 2)}),
    ],
)
def test_validate_settings_patch_ok(body: dict[str, Any], expected: dict[str, Any]) -> None:
    assert validate_settings(body, PATCHABLE_FIELDS) == expected


@pytest.mark.parametrize("field", sorted(DEPLOY_FIELDS - PATCHABLE_FIELDS))
def test_validate_settings_patch_refuses_immutable_fields(field: str) -> None:
    assert field in bad(validate_settings, {field: "x"}, PATCHABLE_FIELDS).message


def full_spec() -> VersionSpec:
    return VersionSpec(
        customer="acme", model="churn", branch="feature/x", version=46, image="img:1", entrypoint="pkg.m:f",
        env={"A": "1"}, batch_size=8, gpu=True, memory_mb=2048, gpu_memory_mb=4096,
        capacity=Capacity(min=1, desired=2, max=5), idle_timeout_s=12.5, keep_warm=True, timeout_s=9.0,
        created_at=123.25, retired=True,
    )


@pytest.mark.parametrize("spec", [VersionSpec("c", "m", "main", 1, "img"), full_spec()])
def test_version_spec_round_trip(spec: VersionSpec) -> None:
    data = spec.to_dict()
    assert isinstance(data["capacity"], dict)
    back = VersionSpec.from_dict(orjson.loads(orjson.dumps(data)))
    assert back == spec
    assert isinstance(back.capacity, Capacity)


def test_an_auto_idle_timeout_is_shown_and_stored_as_auto() -> None:
    fields = validate_deploy({"image": "img", "idle_timeout_s": "auto"})
    spec = VersionSpec(customer="c", model="m", branch="main", version=1, **fields)
    assert spec.idle_auto and spec.idle_timeout_s == AUTO_FALLBACK_IDLE_S
    data = orjson.loads(orjson.dumps(spec.to_dict()))
    assert data["idle_timeout_s"] == "auto" and "idle_auto" not in data
    assert VersionSpec.from_dict(data) == spec
    # A PATCH to a number turns prediction off again.
    fixed = dataclasses.replace(spec, **validate_settings({"idle_timeout_s": 45}, PATCHABLE_FIELDS))
    assert not fixed.idle_auto and fixed.to_dict()["idle_timeout_s"] == 45.0


def test_version_spec_key_and_unknown_fields_ignored() -> None:
    data = full_spec().to_dict() | {"future_field": 1}
    spec = VersionSpec.from_dict(data)
    assert spec.key == "acme/churn/feature/x/46"


def test_version_spec_from_deploy_fields() -> None:
    fields = validate_deploy({"image": "img", "capacity": {"min": 1}, "timeout_s": 5})
    spec = VersionSpec(customer="c", model="m", branch="main", version=1, **fields)
    assert VersionSpec.from_dict(spec.to_dict()) == spec


def chunk_body(**changes: Any) -> dict[str, Any]:
    body = {"version": "c/m/main/1", "created_at": 12.5, "inputs": [1, 2], "timeout_s": 5, "request_id": "req-1"}
    body.update(changes)
    return {k: v for k, v in body.items() if v is not ...}


def test_chunk_wire_form_names_the_version_and_carries_no_spec() -> None:
    spec = VersionSpec("c", "m", "feat/x", 3, "img", env={"A": "1"}, created_at=7.0)
    wire = ChunkRequest(spec=spec, inputs=[1], timeout_s=2.0, request_id="r", may_start=False,
                        chunk_id="abc:0").to_dict()
    assert wire == {"version": "c/m/feat/x/3", "created_at": 7.0, "inputs": [1], "timeout_s": 2.0, "request_id": "r",
                    "may_start": False, "batch": False, "chunk_id": "abc:0"}
    call = ChunkCall.from_dict(orjson.loads(orjson.dumps(wire)))
    assert (call.version, call.created_at, call.inputs, call.timeout_s, call.request_id, call.may_start,
            call.chunk_id) == ("c/m/feat/x/3", 7.0, [1], 2.0, "r", False, "abc:0")


@pytest.mark.parametrize("chunk_id", ["x" * 129, 5, "a\nb", "é"])
def test_a_chunk_id_is_short_printable_ascii(chunk_id: object) -> None:
    wire = {"version": "c/m/main/1", "created_at": 1.0, "inputs": [], "timeout_s": 1.0, "chunk_id": chunk_id}
    with pytest.raises(ApiError) as info:
        ChunkCall.from_dict(wire)
    assert info.value.status == 400


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (None, 400),
        ([1], 400),
        (chunk_body(inputs=...), 400),
        (chunk_body(inputs="abc"), 400),
        (chunk_body(version=...), 400),
        (chunk_body(version="c/m/main"), 400),
        (chunk_body(version="c/m/main/0"), 400),
        (chunk_body(version="c/m/main/²"), 400),
        (chunk_body(version="C!/m/main/1"), 400),
        (chunk_body(version=["c"]), 400),
        (chunk_body(created_at=...), 400),
        (chunk_body(created_at="x"), 400),
        (chunk_body(timeout_s=...), 400),
        (chunk_body(timeout_s=None), 400),
        (chunk_body(timeout_s="soon"), 400),
        (chunk_body(timeout_s=0), 504),
        (chunk_body(timeout_s=-0.5), 504),
        (chunk_body(timeout_s=float("nan")), 504),
        (chunk_body(replicas=0), 400),
        (chunk_body(replicas=True), 400),
        (chunk_body(replicas=1000), 400),
    ],
)
def test_chunk_call_errors(body: Any, status: int) -> None:
    with pytest.raises(ApiError) as info:
        ChunkCall.from_dict(body)
    assert info.value.status == status


def test_chunk_call_without_request_id_or_inputs_for_a_warm_up() -> None:
    assert ChunkCall.from_dict(chunk_body(request_id=...)).request_id == ""
    assert ChunkCall.from_dict(chunk_body(inputs=...), needs_inputs=False).inputs == []


@pytest.mark.parametrize(
    ("key", "parts"),
    [("c/m/main/1", ("c", "m", "main", 1)), ("c/m/a/b/c/12", ("c", "m", "a/b/c", 12))],
)
def test_split_version_key(key: str, parts: tuple[str, str, str, int]) -> None:
    assert split_version_key(key) == parts


def test_chunk_result_round_trip() -> None:
    result = ChunkResult(outputs=[1], stdout="o", stderr="e", error=None, start="cold", timings={"infer_ms": 1.5},
                         proxy_id="p")
    assert ChunkResult.from_dict(result.to_dict() | {"extra": 1}) == result


@pytest.mark.parametrize("check", [lambda v: check_name("customer", v), check_branch, check_alias])
def test_a_trailing_newline_is_not_part_of_a_valid_name(check: Any) -> None:
    with pytest.raises(ApiError):
        check("acme\n")


def test_env_names_with_a_trailing_newline_are_refused() -> None:
    with pytest.raises(ApiError):
        validate_settings({"env": {"A\n": "1"}}, DEPLOY_FIELDS)


@pytest.mark.parametrize("capacity", [{"min": None}, {"desired": None}, {"max": None}])
def test_null_capacity_fields_mean_the_default(capacity: dict[str, Any]) -> None:
    assert validate_settings({"capacity": capacity}, DEPLOY_FIELDS)["capacity"] == Capacity(0, 1, 4)


def test_the_heartbeat_shape_is_defined_once_and_survives_json() -> None:
    from shared.messages import HostCapacity, ProxyHeartbeat, ReplicaReport

    beat = ProxyHeartbeat(
        proxy_id="p1", url="http://10.0.0.2:8081", epoch=3, ts=12.5, runtime="docker",
        capacity=HostCapacity(max_replicas=8, cpus=4, memory_budget_mb=1024),
        replicas=(ReplicaReport("r1", "acme/m/main/1", "running", in_flight=1, cpus=0.5, memory_used_mb=12.5),),
        waiting={"acme/m/main/1": 2}, gpus=({"uuid": "GPU-1", "memory_used_mb": None},), images=("img",),
    )
    assert ProxyHeartbeat.from_dict(orjson.loads(orjson.dumps(beat.to_dict()))) == beat


@pytest.mark.parametrize(
    "data",
    [{}, {"proxy_id": "p"}, {"proxy_id": "p", "url": "u", "epoch": "x"},
     {"proxy_id": "p", "url": "u", "replicas": [{"state": "running"}]},
     {"proxy_id": "p", "url": "u", "capacity": {"max_replicas": "many"}}],
)
def test_malformed_heartbeats_raise(data: dict[str, Any]) -> None:
    from shared.messages import ProxyHeartbeat

    with pytest.raises((KeyError, TypeError, ValueError)):
        ProxyHeartbeat.from_dict(data)


def test_unknown_figures_read_as_defaults() -> None:
    from shared.messages import ProxyHeartbeat

    beat = ProxyHeartbeat.from_dict({"proxy_id": "p", "url": "u", "epoch": None, "ts": 1,
                                     "capacity": {"memory_mb": None}, "waiting": {"v": 0, "w": 1}})
    assert (beat.epoch, beat.capacity.memory_mb, beat.capacity.max_replicas, beat.waiting) == (0, 0, 16, {"w": 1})


def test_at_most_once_is_a_boolean_deploy_and_patch_field() -> None:
    from shared.messages import validate_deploy

    assert validate_deploy({"image": "lukewarm-a/m:1", "at_most_once": True})["at_most_once"] is True
    with pytest.raises(ApiError) as info:
        validate_deploy({"image": "lukewarm-a/m:1", "at_most_once": "yes"})
    assert info.value.status == 400
    assert "at_most_once" in PATCHABLE_FIELDS
