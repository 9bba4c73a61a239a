"""The Python client against a real stack: deploy, predict, and errors as LukewarmError."""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from lukewarm import Client, LukewarmError
from tests.faults.test_proxy_restart import MODELS
from tests.support.stack import ADMIN, running_stack

pytestmark = [pytest.mark.timeout(120)]


async def test_deploy_predict_and_errors(redis_url: str, state_dir: Path) -> None:
    async with running_stack(redis_url, state_dir, "process") as stack:
        key = await stack.customer("acme")
        url = stack.url.replace("127.0.0.1", "localhost")  # the ingress finds the customer in <customer>.localhost
        admin = Client(url, ADMIN, customer="acme")
        deployed = await asyncio.to_thread(admin.deploy, "echo", MODELS, entrypoint="models:echo")
        assert deployed["version"] == 1
        client = Client(url, key, customer="acme", timeout_s=60)
        assert await asyncio.to_thread(client.predict, "echo", {"x": 1}) == {"echo": {"x": 1}}
        assert await asyncio.to_thread(client.predict, "echo", [["a", 1], ["b", 2]], version=1) == \
            [["a", {"echo": 1}], ["b", {"echo": 2}]]

        with pytest.raises(LukewarmError) as info:
            await asyncio.to_thread(client.predict, "nope", 1)
        assert (info.value.status, info.value.type) == (404, "not_found")
        with pytest.raises(LukewarmError) as info:
            await asyncio.to_thread(Client(url, "lw_wrong", customer="acme").predict, "echo", 1)
        assert info.value.status == 401
        with pytest.raises(LukewarmError) as info:
            await asyncio.to_thread(Client("http://127.0.0.1:1", key, customer="acme", timeout_s=5).predict, "echo", 1)
        assert (info.value.status, info.value.type) == (0, "unreachable")


def test_a_client_needs_a_real_url_and_a_customer_to_deploy() -> None:
    with pytest.raises(ValueError):
        Client("localhost:8080", "k")
    with pytest.raises(ValueError):
        Client("http://localhost:8080", "k").deploy("m", "img")
