"""Image references, and which of them a customer's own key may deploy.

A customer may run only images of their own namespace: the repository (the
registry host, tag and digest aside) starting with ``<prefix><customer>/``
(prefix ``lukewarm-`` by default), or one listed as shared. Otherwise one
customer could deploy another's image — cached on a shared host, or pulled
with the host's registry login — and read its code. Host paths and ``dir:``
images (the process runtime's) are never a customer's to name.
"""
from __future__ import annotations

import dataclasses
import re

from shared.errors import BadInput, Forbidden

_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_DOMAIN = r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*|\[[0-9A-Fa-f:]+\])(?::[0-9]+)?"
_REFERENCE = re.compile(
    rf"^(?:(?P<domain>{_DOMAIN})/)?(?P<path>{_COMPONENT}(?:/{_COMPONENT})*)"
    r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?"
    r"(?:@(?P<digest>[a-z0-9]+(?:[+._-][a-z0-9]+)*:[0-9a-fA-F]{32,}))?$"
)
MAX_LENGTH = 255


@dataclasses.dataclass(frozen=True)
class ImageRef:
    domain: str | None
    repository: str
    tag: str | None
    digest: str | None


def invalid_image(message: str) -> BadInput:
    return BadInput(message, "invalid_image")


def parse_image(image: str) -> ImageRef:
    """A Docker image reference split into its parts; 400 ``invalid_image`` for anything else."""
    if image.startswith(("dir:", "/", ".", "~")) or "\\" in image:
        raise invalid_image("image must be an image reference like lukewarm-acme/churn:1, not a path")
    match = _REFERENCE.fullmatch(image) if len(image) <= MAX_LENGTH else None
    if match is None:
        raise invalid_image(f"image is not a valid image reference: {image[:100]!r}")
    domain, path = match.group("domain"), match.group("path")
    # Docker's rule: the first component names a registry only when it looks like a host.
    if domain is not None and not ("." in domain or ":" in domain or domain == "localhost" or domain.startswith("[")):
        if not re.fullmatch(_COMPONENT, domain):
            raise invalid_image(f"image is not a valid image reference: {image[:100]!r}")
        path, domain = f"{domain}/{path}", None
    return ImageRef(domain=domain, repository=path, tag=match.group("tag"), digest=match.group("digest"))


def check_customer_image(image: str, customer: str, prefix: str, shared: frozenset[str]) -> ImageRef:
    """The parsed image when ``customer``'s own key may deploy it; 400 or 403 ``image_not_allowed``."""
    ref = parse_image(image)
    if ref.repository.startswith(f"{prefix}{customer}/") or ref.repository in shared:
        return ref
    raise Forbidden(f"a customer key may deploy only images under {prefix}{customer}/ or a shared image", "image_not_allowed")


def shared_repositories(setting: str) -> frozenset[str]:
    """``LUKEWARM_SHARED_IMAGES`` (comma-separated) as repositories, tags and registry hosts aside."""
    out = set()
    for item in setting.split(","):
        if item.strip():
            out.add(parse_image(item.strip()).repository)
    return frozenset(out)
