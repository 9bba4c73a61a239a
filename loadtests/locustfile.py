"""Real traffic shapes for Locust (``pip install locust``; not a dependency of the project):

    LUKEWARM_KEY=lw_… LUKEWARM_CUSTOMER=demo locust -f loadtests/locustfile.py --host http://localhost:8080 \\
        --headless -u 50 -r 10 -t 5m

Three kinds of caller, weighted as a product team's traffic tends to be: many interactive callers of
one hot model (small inputs, think time), a few batch jobs (hundreds of items, ``X-Lukewarm-Priority:
batch``), and a long tail of rarely called models (``LUKEWARM_TAIL_MODELS``, comma-separated: each call
likely meets a paused or stopped replica, i.e. a lukewarm or cold start). Every answer is checked: a
200 must carry ``data``; a clear error (the contract's JSON, ``Retry-After`` on 429/503) is reported
as a failure by its type, anything else as ``lost``. Start kinds (warm, lukewarm, cold) are recorded
from ``Server-Timing`` as separate Locust request names, so their latencies are apart in the report.
"""
from __future__ import annotations

import os
import random
from typing import Any

from locust import HttpUser, between, task  # type: ignore[import-not-found]

KEY = os.environ.get("LUKEWARM_KEY", "")
CUSTOMER = os.environ.get("LUKEWARM_CUSTOMER", "demo")
BASE_DOMAIN = os.environ.get("LUKEWARM_BASE_DOMAIN", "localhost")
HOT_MODEL = os.environ.get("LUKEWARM_HOT_MODEL", "hello")
TAIL_MODELS = [m for m in os.environ.get("LUKEWARM_TAIL_MODELS", "").split(",") if m]
BATCH_ITEMS = int(os.environ.get("LUKEWARM_BATCH_ITEMS", "500"))


def start_kind(server_timing: str) -> str:
    marker = 'start;desc="'
    return server_timing.split(marker, 1)[1].split('"', 1)[0] if marker in server_timing else "warm"


class LukewarmUser(HttpUser):  # type: ignore[misc]
    abstract = True

    def call(self, model: str, data: Any, name: str, batch: bool = False) -> None:
        headers = {"Authorization": KEY, "Host": f"{CUSTOMER}.{BASE_DOMAIN}"}
        if batch:
            headers["X-Lukewarm-Priority"] = "batch"
        with self.client.post(f"/v1/{model}/latest", json={"data": data}, headers=headers, name=name,
                              catch_response=True) as resp:
            try:
                body = resp.json()
            except ValueError:
                resp.failure(f"lost: {resp.status_code} not JSON")
                return
            if resp.status_code == 200 and isinstance(body, dict) and "data" in body:
                resp.request_meta["name"] = f"{name} [{start_kind(resp.headers.get('Server-Timing', ''))}]"
                resp.success()
            elif isinstance(body, dict) and isinstance(body.get("type"), str) and resp.status_code != 500 and \
                    (resp.status_code not in (429, 503) or "Retry-After" in resp.headers):
                resp.failure(f"{resp.status_code} {body['type']}")
            else:
                resp.failure(f"lost: {resp.status_code} {str(body)[:100]}")


class Interactive(LukewarmUser):
    """A person behind an app: one small input, then a pause."""

    weight = 20
    wait_time = between(0.2, 2.0)

    @task
    def predict(self) -> None:
        self.call(HOT_MODEL, {"name": f"user{random.randint(1, 10_000)}"}, "interactive")


class BatchJob(LukewarmUser):
    """A scheduled job: hundreds of items at once, at batch priority."""

    weight = 2
    wait_time = between(5.0, 15.0)

    @task
    def batch(self) -> None:
        self.call(HOT_MODEL, [[i, {"name": f"row{i}"}] for i in range(BATCH_ITEMS)], "batch", batch=True)


class LongTail(LukewarmUser):
    """Rarely used models: most calls meet a replica that was paused or stopped."""

    weight = 1
    wait_time = between(10.0, 60.0)

    @task
    def rare(self) -> None:
        if TAIL_MODELS:
            self.call(random.choice(TAIL_MODELS), {"name": "tail"}, "tail")
