"""/openapi.json stays true: every route of the ingress is in it, and nothing in it is not a route."""
from __future__ import annotations

import orjson
from aiohttp.test_utils import TestClient, TestServer

from ingress.app import build_app
from ingress.openapi import DOCUMENT
from shared.settings import IngressSettings

SETTINGS = IngressSettings(redis_url="redis://127.0.0.1:1/0", admin_token="a", proxy_secret="s")


def test_every_route_is_documented_and_every_documented_path_is_a_route() -> None:
    app = build_app(SETTINGS)
    routes = {(r.method.lower(), r.resource.canonical) for r in app.router.routes()  # type: ignore[union-attr]
              if r.method not in ("HEAD", "*")}
    documented = {(method, path) for path, ops in DOCUMENT["paths"].items() for method in ops}
    assert routes - documented == set(), "routes missing from /openapi.json"
    assert documented - routes == set(), "documented paths that are no routes"


def test_each_operation_answers_and_names_its_errors_in_the_one_shape() -> None:
    for path, ops in DOCUMENT["paths"].items():
        for method, op in ops.items():
            assert op["summary"] and op["responses"], (method, path)
            for status, response in op["responses"].items():
                if int(status) >= 400:
                    assert response["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}


async def test_the_document_is_served_without_credentials() -> None:
    app = build_app(SETTINGS)
    app.cleanup_ctx.clear()  # no Redis needed to serve a static document
    async with TestClient(TestServer(app)) as client:
        resp = await client.get("/openapi.json")
        assert resp.status == 200
        assert orjson.loads(await resp.read())["openapi"] == "3.1.0"
