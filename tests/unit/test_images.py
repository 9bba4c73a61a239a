"""Image references and which a customer's own key may deploy (DESIGN.md, Trust)."""
from __future__ import annotations

import pytest

from shared.errors import ApiError
from shared.images import ImageRef, check_customer_image, parse_image, shared_repositories


@pytest.mark.parametrize(
    ("image", "ref"),
    [
        ("lukewarm-acme/churn", ImageRef(None, "lukewarm-acme/churn", None, None)),
        ("lukewarm-acme/churn:1.2", ImageRef(None, "lukewarm-acme/churn", "1.2", None)),
        ("registry.example.com:5000/lukewarm-acme/churn:v1",
         ImageRef("registry.example.com:5000", "lukewarm-acme/churn", "v1", None)),
        ("localhost/lukewarm-acme/x", ImageRef("localhost", "lukewarm-acme/x", None, None)),
        ("lukewarm-acme/churn@sha256:" + "a" * 64, ImageRef(None, "lukewarm-acme/churn", None, "sha256:" + "a" * 64)),
        ("python", ImageRef(None, "python", None, None)),
    ],
)
def test_parse_image(image: str, ref: ImageRef) -> None:
    assert parse_image(image) == ref


@pytest.mark.parametrize(
    "image",
    ["dir:/etc", "/", "/srv/code", "./code", "../x", "~/x", "UPPER/case", "a//b", "a/b:", "a/b@sha256:zz",
     "x" * 300, "a\\b", "sha256:" + "a" * 64 + "/x"],
)
def test_paths_and_malformed_references_are_invalid(image: str) -> None:
    with pytest.raises(ApiError) as info:
        parse_image(image)
    assert (info.value.status, info.value.type) == (400, "invalid_image")


@pytest.mark.parametrize(
    ("image", "allowed"),
    [
        ("lukewarm-acme/churn:1", True),
        ("reg.internal:5000/lukewarm-acme/a/b@sha256:" + "b" * 64, True),
        ("lukewarm-acme2/churn", False),  # another customer whose name starts the same
        ("lukewarm-globex/churn", False),
        ("lukewarm-acmeevil/x", False),
        ("evil/lukewarm-acme/x", False),
        ("sha256", False),
        ("lukewarm/python:bookworm", True),  # shared
        ("reg.internal/lukewarm/python", True),
        ("lukewarm/python-evil", False),
    ],
)
def test_customer_images(image: str, allowed: bool) -> None:
    shared = shared_repositories("lukewarm/python:bookworm, ")
    if allowed:
        check_customer_image(image, "acme", "lukewarm-", shared)
    else:
        with pytest.raises(ApiError) as info:
            check_customer_image(image, "acme", "lukewarm-", shared)
        assert (info.value.status, info.value.type) == (403, "image_not_allowed")


def test_a_path_from_a_customer_is_invalid_not_forbidden() -> None:
    with pytest.raises(ApiError) as info:
        check_customer_image("dir:/", "acme", "lukewarm-", frozenset())
    assert (info.value.status, info.value.type) == (400, "invalid_image")
