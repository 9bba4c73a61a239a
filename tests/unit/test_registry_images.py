"""Images through a registry, the pure parts: which registry a reference names, the digest a version is
pinned to, the login file (a Docker config.json), and where ``lukewarm deploy --build`` pushes."""
from __future__ import annotations

import base64
from pathlib import Path

import orjson
import pytest

from runtime_proxy.docker_runtime import (
    MAX_AUTH_FILE_BYTES, parse_registry_auths, pinned_reference, read_registry_auths, registry_host,
)
from lukewarm.cli import push_target

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64


@pytest.mark.parametrize(
    ("reference", "host"),
    [
        ("127.0.0.1:5000/lukewarm-acme/m@" + D1, "127.0.0.1:5000"),
        ("reg.example.com/lukewarm-acme/m:1", "reg.example.com"),
        ("localhost/x", "localhost"),
        ("Reg.Example.com:443/x", "reg.example.com:443"),
        ("lukewarm-acme/m:1", "docker.io"),  # a first component without a dot or port is a path
        ("python", "docker.io"),
        ("index.docker.io/library/python", "docker.io"),
    ],
)
def test_registry_host(reference: str, host: str) -> None:
    assert registry_host(reference) == host


@pytest.mark.parametrize(
    ("image", "repo_digests", "pinned"),
    [
        # A tag of a pushed or pulled image: the digest of the same name.
        ("reg:5000/lukewarm-acme/m:1", [f"reg:5000/lukewarm-acme/m@{D1}"], f"reg:5000/lukewarm-acme/m@{D1}"),
        # A digest reference names itself.
        (f"reg:5000/a/m@{D2}", [f"reg:5000/a/m@{D1}", f"reg:5000/a/m@{D2}"], f"reg:5000/a/m@{D2}"),
        # Several of the same name (one content, several manifests): one of them, always the same.
        ("reg:5000/a/m", [f"reg:5000/a/m@{D2}", f"reg:5000/a/m@{D1}"], f"reg:5000/a/m@{D1}"),
        # Built here only: nothing any other host could pull.
        ("lukewarm-acme/m:latest", [], ""),
        # Another repository's digest is not this name's to run (and is not what this name pulls).
        ("lukewarm-acme/m:latest", [f"reg:5000/lukewarm-acme/m@{D1}"], ""),
        ("reg:5000/lukewarm-acme/m:1", [f"reg:5000/lukewarm-globex/m@{D1}"], ""),
        ("reg:5000/a/m:1", ["reg:5000/a/m@sha256:short", "reg:5000/a/m"], ""),
    ],
)
def test_pinned_reference(image: str, repo_digests: list[str], pinned: str) -> None:
    assert pinned_reference(image, repo_digests) == pinned


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_login_file_entries_by_host() -> None:
    doc = {"auths": {
        "127.0.0.1:5000": {"auth": _b64("alice:pa:ss")},
        "https://reg.example.com/v2/": {"username": "bob", "password": "pw"},
        "https://index.docker.io/v1/": {"identitytoken": "tok"},
        "helper.example.com": {},  # a credential helper's: no login of its own
    }, "credsStore": "desktop"}
    logins = parse_registry_auths(orjson.dumps(doc))
    assert logins == {
        "127.0.0.1:5000": {"username": "alice", "password": "pa:ss", "serveraddress": "127.0.0.1:5000"},
        "reg.example.com": {"username": "bob", "password": "pw", "serveraddress": "reg.example.com"},
        "docker.io": {"identitytoken": "tok", "serveraddress": "docker.io"},
    }
    assert parse_registry_auths(b"{}") == {}


@pytest.mark.parametrize(
    "data",
    [b"not json", b"[]", b'{"auths": []}', b'{"auths": {"r:5000": "x"}}', b'{"auths": {"r:5000": {"auth": "!!"}}}',
     orjson.dumps({"auths": {"r:5000": {"auth": _b64("no-colon")}}}),
     b'{"auths": {"r:5000": {"username": "u", "password": 5}}}'],
)
def test_a_malformed_login_file_is_a_clear_error(data: bytes) -> None:
    with pytest.raises(ValueError) as info:
        parse_registry_auths(data)
    assert "\n" not in str(info.value) and str(info.value)


def test_reading_the_login_file_is_bounded_and_names_it(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_bytes(orjson.dumps({"auths": {"r:5000": {"auth": _b64("u:p")}}}))
    assert read_registry_auths(str(path))["r:5000"]["username"] == "u"
    path.write_bytes(b" " * (MAX_AUTH_FILE_BYTES + 1))
    with pytest.raises(ValueError, match="larger than"):
        read_registry_auths(str(path))
    path.write_bytes(b"{")
    with pytest.raises(ValueError, match=f"registry login file {path}: not JSON"):
        read_registry_auths(str(path))
    with pytest.raises(ValueError, match="registry login file .*missing"):
        read_registry_auths(str(tmp_path / "missing"))


@pytest.mark.parametrize(
    ("registry", "image", "target"),
    [
        ("127.0.0.1:5000", "", ("127.0.0.1:5000/lukewarm-acme/churn", "T")),
        ("reg.example.com/", "", ("reg.example.com/lukewarm-acme/churn", "T")),
        ("127.0.0.1:5000", "lukewarm-acme/churn:stable", ("127.0.0.1:5000/lukewarm-acme/churn", "stable")),
        ("127.0.0.1:5000", "127.0.0.1:5000/lukewarm-acme/x", ("127.0.0.1:5000/lukewarm-acme/x", "T")),
    ],
)
def test_push_target(registry: str, image: str, target: tuple[str, str]) -> None:
    assert push_target(registry, "acme", "churn", image, "T") == target


@pytest.mark.parametrize(
    ("registry", "image", "words"),
    [
        ("http://127.0.0.1:5000", "", "registry host"),
        ("myregistry", "", "registry host"),  # a path component, not a host: it would push to Docker Hub
        ("reg.example.com/team", "", "registry host"),
        ("127.0.0.1:5000", "other.example.com/lukewarm-acme/x", "names registry other.example.com"),
        ("127.0.0.1:5000", f"lukewarm-acme/x@{D1}", "not a digest"),
        ("127.0.0.1:5000", "/srv/x", "--image"),
    ],
)
def test_push_target_refusals_are_one_line(registry: str, image: str, words: str) -> None:
    with pytest.raises(SystemExit) as info:
        push_target(registry, "acme", "churn", image, "T")
    assert words in str(info.value.code) and "\n" not in str(info.value.code)
