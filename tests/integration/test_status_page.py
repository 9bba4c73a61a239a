"""The status page (/status): what a person on call sees in a real browser, and its HTTP contract.

The browser is Debian's ``chromium`` driven by Playwright with that executable (no browser download).
Without chromium or the ``playwright`` package the browser tests skip, and FAIL when ``CI`` is set.
The screenshot goes to pytest's tmp_path, and is copied to ``$LUKEWARM_TEST_ARTIFACTS`` when that is set.
"""
from __future__ import annotations

import html
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aredis
from multidict import CIMultiDictProxy

from ingress import state, status_auth, status_page
from ingress.router import ProxyState
from shared import keys
from shared.errors import ApiError
from shared.messages import ProxyHeartbeat
from shared.tls import make_dev_ca
from tests.conftest import missing
from tests.support.stack import ADMIN, REPO_ROOT, Stack, running_stack, wait_until

pytestmark = [pytest.mark.timeout(180)]

MODELS = f"dir:{REPO_ROOT / 'tests' / 'support' / 'models'}"
VERSION = "acme/echo/main/1"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WAIT_MS = 20_000  # a refresh comes every 5 s: four chances


# ---- pure parts: sessions, the limiter, rendering -------------------------------------------------

def test_a_session_is_good_until_it_expires_and_only_under_its_admin_token() -> None:
    token = status_auth.issue_session("admin-a", 1000.0, "ab" * 16, lifetime_s=60)
    assert status_auth.read_session("admin-a", token, 1059.0) == ("ab" * 16, 1060.0)
    assert status_auth.read_session("admin-a", token, 1060.0) is None  # expired
    assert status_auth.read_session("admin-b", token, 1001.0) is None  # the admin token was rotated
    assert status_auth.read_session("", token, 1001.0) is None
    expires, nonce, mac = token.split(".")
    for forged in (f"{int(expires) + 3600}.{nonce}.{mac}", f"{expires}.{'cd' * 16}.{mac}", f"{expires}.{nonce}.{'0' * 64}",
                   "", "a.b", f"{expires}.{nonce}.{mac}.x", f"-1.{nonce}.{mac}", "ü.ü.ü", f"{expires}.{nonce}\udcff.{mac}",
                   f"{expires}.{nonce}.{mac.upper()}", f"{expires}\n.{nonce}.{mac}"):
        assert status_auth.read_session("admin-a", forged, 1001.0) is None, forged


def test_sign_outs_are_bounded() -> None:
    book = status_auth.SignOuts(max_entries=3)
    for n in range(5):
        book.revoke(f"n{n}", expires=100.0, now=0.0)
    assert [book.revoked(f"n{n}") for n in range(5)] == [False, False, True, True, True]
    book.revoke("late", expires=200.0, now=150.0)  # the expired ones go first
    assert book.revoked("late") and book.revoked("n4") is False


def test_failed_sign_ins_are_limited_per_address_in_windows() -> None:
    limiter = status_auth.LoginLimiter(max_failures=2, window_s=60.0, max_clients=2)
    for _ in range(2):
        assert limiter.retry_after_s("a", 0.0) == 0.0
        limiter.failed("a", 0.0)
    assert limiter.retry_after_s("a", 10.0) == 50.0
    assert limiter.retry_after_s("b", 10.0) == 0.0  # another address is not held back
    assert limiter.retry_after_s("a", 60.0) == 0.0  # a new window
    limiter.failed("b", 0.0)
    for _ in range(2):
        limiter.failed("c", 1.0)  # past max_clients: new addresses share one window
    assert limiter.retry_after_s("d", 2.0) > 0 and limiter.retry_after_s("b", 2.0) == 0.0
    assert limiter.retry_after_s("e", 61.0) == 0.0  # old windows pruned, room again


def test_start_phases_come_in_start_order_without_queue_or_inference() -> None:
    timings = {"ready_ms": 3.04, "queue_ms": 9.0, "create_ms": 1.0, "gpu_ms": 2.0, "infer_ms": 4.0, "total_ms": 9.0}
    assert status_page.start_phases(timings) == (("create", 1.0), ("ready", 3.0), ("gpu", 2.0))


def hostile_fleet() -> status_page.Fleet:
    evil = '<script>alert("x")</script>'
    beat = ProxyHeartbeat.from_dict({
        "proxy_id": evil, "url": evil, "epoch": 1, "ts": 99.0, "nvml": evil, "waiting": {evil: 2},
        "replicas": [{"replica_id": evil, "version": evil, "state": evil}],
        "gpus": [{"uuid": evil, "name": evil, "memory_used_mb": evil, "utilization_pct": 30, "version": evil}],
    })
    start = status_page.StartRecord(99.0, evil, evil, (evil,), ((evil, 1.0),), evil)
    error = status_page.ErrorRecord(99.0, evil, evil, evil, evil)
    return status_page.Fleet(now=100.0, redis_error="", redis_ms=1.0, view_age_s=0.1, max_age_s=15.0,
                             proxies=(beat,), malformed=(evil,), starts=(start,), errors=(error,))


def test_everything_rendered_is_escaped() -> None:
    fragment = status_page.render_fleet(hostile_fleet())
    assert "<script" not in fragment and "alert(\"x\")" not in fragment
    assert html.escape('<script>alert("x")</script>') in fragment
    assert 'class="state other"' in fragment  # a state class only from the known set


def test_a_proxy_from_the_view_renders_like_one_from_redis() -> None:
    beat = {"proxy_id": "p1", "url": "http://127.0.0.2:1", "epoch": 3, "ts": 99.0,
            "replicas": [{"replica_id": "r1", "version": VERSION, "state": "paused"}],
            "gpus": [{"uuid": "GPU-1", "memory_total_mb": 80, "memory_used_mb": 8}]}
    fleet = status_page.Fleet(now=100.0, redis_error="unreachable (ConnectionError)", redis_ms=2.0,
                              view_age_s=30.0, max_age_s=15.0,
                              proxies=(status_page.from_view(ProxyState.from_heartbeat(beat)),))
    fragment = status_page.render_fleet(fleet)
    assert "p1" in fragment and VERSION in fragment and 'class="state paused"' in fragment
    assert "unreachable (ConnectionError)" in fragment and "8 / 80 MiB" in fragment


def test_a_gpu_shows_its_nvml_memory_and_utilisation() -> None:
    # The entry's shape as runtime_proxy/gpu.py puts it in the heartbeat.
    gpu = {"uuid": "GPU-00000001-0000-0000-0000-000000000000", "index": 1, "name": "NVIDIA H200",
           "memory_total_mb": 143771, "memory_used_mb": 40960, "utilization_pct": 87, "version": VERSION,
           "container": "c1", "resident_s": 12.5, "swapping": True, "containers": {"c1": 40000}, "other_mb": 0,
           "stale": False}
    beat = ProxyHeartbeat.from_dict({"proxy_id": "p1", "url": "u", "epoch": 1, "ts": 99.0, "gpus": [gpu],
                                     "nvml": "ok"})
    fleet = status_page.Fleet(now=100.0, redis_error="", redis_ms=1.0, view_age_s=0.1, max_age_s=15.0,
                              proxies=(beat,))
    fragment = status_page.render_fleet(fleet)
    assert "NVIDIA H200: 40960 / 143771 MiB, util 87 %" in fragment and f"· {VERSION} · swapping" in fragment
    assert "NVML" not in fragment and "not reported" in fragment  # NVML fine; no host figures in this beat


# ---- a real stack, over HTTP ----------------------------------------------------------------------

async def echo_stack(stack: Stack) -> Stack:
    """acme's echo deployed and called once: one replica running."""
    await stack.customer("acme")
    await stack.deploy("echo", MODELS, "models:echo")
    assert (await stack.call("echo", 1))[0] == 200
    return stack


async def fetch(stack: Stack, method: str, path: str, headers: dict[str, str] | None = None,
                data: dict[str, str] | None = None) -> tuple[int, str, CIMultiDictProxy[str]]:
    """One request as a browser or script would send it, redirects not followed, no cookie jar."""
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session, \
            session.request(method, stack.url + path, headers=headers, data=data, allow_redirects=False,
                            timeout=aiohttp.ClientTimeout(total=30)) as resp:
        return resp.status, await resp.text(), resp.headers


def same_origin(stack: Stack) -> dict[str, str]:
    return {"Origin": stack.url}


def bearer() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN}"}


async def sign_in(stack: Stack) -> str:
    """The session cookie's value after a sign-in with the admin token."""
    status, _, headers = await fetch(stack, "POST", "/status/login", same_origin(stack), {"token": ADMIN})
    assert status == 303 and headers["Location"] == "/status", status
    cookie = SimpleCookie()
    cookie.load(headers["Set-Cookie"])
    return cookie[status_page.COOKIE].value


def no_fleet_data(text: str, stack: Stack) -> bool:
    return all(secret not in text for secret in (stack.proxies[0].proxy_id, VERSION, "127.0.0.2"))


async def test_signed_out_there_is_only_the_form(redis_url: str, state_dir: Path) -> None:
    async with running_stack(redis_url, state_dir, "process") as stack:
        await echo_stack(stack)
        status, text, _ = await fetch(stack, "GET", "/status")
        assert status == 200 and 'type="password"' in text and no_fleet_data(text, stack)
        status, text, _ = await fetch(stack, "GET", "/status/fleet")
        assert status == 401 and orjson.loads(text)["type"] == "unauthorized"
        # A script with a wrong token gets the error, not a form.
        status, text, _ = await fetch(stack, "GET", "/status", {"Authorization": "Bearer not-it"})
        assert status == 401 and orjson.loads(text)["type"] == "unauthorized"
        forged = status_auth.issue_session("another-admin-token", time.time(), "ab" * 16)
        for value in (forged, "é.é.é", "1." * 300):
            status, text, _ = await fetch(stack, "GET", "/status", {"Cookie": f"{status_page.COOKIE}={value}"})
            assert status == 200 and 'type="password"' in text and no_fleet_data(text, stack), value


async def test_a_script_reads_the_page_with_the_bearer(redis_url: str, state_dir: Path) -> None:
    async with running_stack(redis_url, state_dir, "process") as stack:
        await echo_stack(stack)
        proxy_id = stack.proxies[0].proxy_id

        async def shows_running() -> bool:
            status, text, _ = await fetch(stack, "GET", "/status", bearer())
            assert status == 200
            return proxy_id in text and VERSION in text and '<span class="state running">running</span>' in text

        await wait_until(shows_running, 10, "the page to show the running replica")
        status, text, headers = await fetch(stack, "GET", "/status/fleet", bearer())
        assert status == 200 and headers["Content-Type"].startswith("text/html") and VERSION in text
        assert "<html" not in text  # a fragment: what the page's refresh puts in place


async def test_sign_in_sets_a_strict_http_only_cookie_and_sign_out_ends_it(redis_url: str, state_dir: Path) -> None:
    async with running_stack(redis_url, state_dir, "process") as stack:
        await echo_stack(stack)
        status, _, headers = await fetch(stack, "POST", "/status/login", same_origin(stack), {"token": ADMIN})
        assert status == 303 and headers["Cache-Control"] == "no-store"
        morsel = SimpleCookie(headers["Set-Cookie"])[status_page.COOKIE]
        assert morsel["httponly"] is True and morsel["samesite"] == "Strict" and morsel["path"] == "/status"
        assert not morsel["secure"]  # plain HTTP here; over TLS it is (test_over_tls_the_cookie_is_secure)
        assert int(morsel["max-age"]) == status_page.SESSION_LIFETIME_S and ADMIN not in morsel.value
        cookie = {"Cookie": f"{status_page.COOKIE}={morsel.value}"}
        status, text, _ = await fetch(stack, "GET", "/status", cookie)
        assert status == 200 and stack.proxies[0].proxy_id in text and 'action="/status/logout"' in text
        assert (await fetch(stack, "GET", "/status/fleet", cookie))[0] == 200

        status, _, headers = await fetch(stack, "POST", "/status/logout", {**cookie, **same_origin(stack)})
        assert status == 303 and headers["Location"] == "/status"
        gone = SimpleCookie(headers["Set-Cookie"])[status_page.COOKIE]
        assert gone.value == "" and gone["max-age"] == "0" and gone["path"] == "/status"
        # The old cookie, replayed, is signed out at this ingress.
        status, text, _ = await fetch(stack, "GET", "/status", cookie)
        assert status == 200 and 'type="password"' in text and no_fleet_data(text, stack)
        assert (await fetch(stack, "GET", "/status/fleet", cookie))[0] == 401


async def test_over_tls_the_cookie_is_secure(redis_url: str, state_dir: Path, tmp_path: Path) -> None:
    certs = make_dev_ca(tmp_path / "tls", "localhost")
    stack = Stack(redis_url, state_dir, "process")
    try:
        # An ingress alone: the sign-in needs no proxy. Its session trusts the test CA only.
        await stack.start_ingress(tls_ca=str(certs.ca_cert), tls_cert=str(certs.cert), tls_key=str(certs.key))
        assert stack.session is not None and stack.url.startswith("https://")
        async with stack.session.post(stack.url + "/status/login", data={"token": ADMIN}, headers=same_origin(stack),
                                      allow_redirects=False, timeout=aiohttp.ClientTimeout(total=30)) as resp:
            assert resp.status == 303
            morsel = SimpleCookie(resp.headers["Set-Cookie"])[status_page.COOKIE]
        assert morsel["secure"] is True and morsel["httponly"] is True and morsel["samesite"] == "Strict"
    finally:
        await stack.close()


async def test_a_wrong_token_is_401_with_the_form_and_no_fleet_data(redis_url: str, state_dir: Path) -> None:
    async with running_stack(redis_url, state_dir, "process") as stack:
        await echo_stack(stack)
        for token in ("wrong", "", ADMIN + "x", ADMIN[:-1], "ü" * 10):
            status, text, headers = await fetch(stack, "POST", "/status/login", same_origin(stack), {"token": token})
            assert status == 401 and 'type="password"' in text and "not the admin token" in text, token
            assert no_fleet_data(text, stack) and "Set-Cookie" not in headers


async def test_sign_in_posts_from_elsewhere_are_refused(redis_url: str, state_dir: Path) -> None:
    """CSRF: the cookie is SameSite=Strict, and the form's POSTs must name this host as their origin."""
    async with running_stack(redis_url, state_dir, "process") as stack:
        for headers in ({}, {"Origin": "http://evil.example"}, {"Origin": "null"},
                        {"Referer": "http://evil.example/status"}, {"Origin": stack.url + ".evil.example"}):
            status, text, answer = await fetch(stack, "POST", "/status/login", headers, {"token": ADMIN})
            assert status == 403 and "Set-Cookie" not in answer, headers
            assert orjson.loads(text)["type"] == "forbidden"
            assert (await fetch(stack, "POST", "/status/logout", headers))[0] == 403
        status, _, _ = await fetch(stack, "POST", "/status/login", {"Referer": stack.url + "/status"},
                                   {"token": ADMIN})
        assert status == 303  # a Referer of this host is enough when a browser sends no Origin
        status, _, headers = await fetch(stack, "GET", "/status/login")
        assert (status, headers["Location"]) == (303, "/status")  # reloading the sign-in URL goes back to the page


async def test_failed_sign_ins_are_rate_limited(redis_url: str, state_dir: Path) -> None:
    async with running_stack(redis_url, state_dir, "process") as stack:
        limiter = status_auth.LoginLimiter()
        for _ in range(limiter.max_failures):
            status, _, _ = await fetch(stack, "POST", "/status/login", same_origin(stack), {"token": "guess"})
            assert status == 401
        status, text, headers = await fetch(stack, "POST", "/status/login", same_origin(stack), {"token": "guess"})
        assert status == 429 and 0 < int(headers["Retry-After"]) <= 60 and 'type="password"' in text
        # Held back before the token is looked at: even the right one waits out the window.
        status, _, headers = await fetch(stack, "POST", "/status/login", same_origin(stack), {"token": ADMIN})
        assert status == 429 and "Set-Cookie" not in headers
        assert (await fetch(stack, "GET", "/status", bearer()))[0] == 200  # scripts are not held back


async def test_the_page_runs_only_its_own_script_and_style(redis_url: str, state_dir: Path) -> None:
    async with running_stack(redis_url, state_dir, "process") as stack:
        for headers in (bearer(), {}):
            status, text, answer = await fetch(stack, "GET", "/status", headers)
            assert status == 200
            policy = dict(part.strip().split(" ", 1) for part in answer["Content-Security-Policy"].split(";"))
            nonce = policy["script-src"].removeprefix("'nonce-").removesuffix("'")
            assert policy["default-src"] == "'none'" and policy["style-src"] == f"'nonce-{nonce}'"
            assert policy["connect-src"] == "'self'" and policy["frame-ancestors"] == "'none'"
            assert policy["form-action"] == "'self'" and len(nonce) >= 16
            assert text.count("<script") == text.count(f'<script nonce="{nonce}">')
            assert text.count("<style") == text.count(f'<style nonce="{nonce}">') == 1
            assert " style=" not in text and "src=" not in text and "http" not in text.split("<main")[0]
            assert answer["X-Content-Type-Options"] == "nosniff" and answer["Cache-Control"] == "no-store"
            assert answer["Referrer-Policy"] == "same-origin"  # no-referrer would make a POST's Origin null
        other = (await fetch(stack, "GET", "/status", bearer()))[2]["Content-Security-Policy"]
        assert other != answer["Content-Security-Policy"]  # a fresh nonce each time


async def test_with_redis_failing_the_page_shows_this_ingress_view(redis_url: str, state_dir: Path) -> None:
    async with running_stack(redis_url, state_dir, "process") as stack:
        await echo_stack(stack)
        await wait_until(lambda: any(r.state == "running" for p in stack.app[state.VIEW].live_proxies()
                                     for r in p.replicas), 10, "the view to see the replica running")

        async def failing() -> list[dict[str, Any]]:
            raise aredis.ConnectionError("Redis is down (simulated)")

        stack.app[state.REGISTRY].list_proxies = failing  # type: ignore[method-assign]
        status, text, _ = await fetch(stack, "GET", "/status", bearer())
        assert status == 200 and "unreachable (ConnectionError)" in text and "last view" in text
        assert stack.proxies[0].proxy_id in text and '<span class="state running">running</span>' in text


EVIL = '<script>alert("{n}")</script>'


async def put_hostile_heartbeats(redis_url: str) -> list[str]:
    """A proxy whose heartbeat holds markup everywhere, and one whose heartbeat does not parse; the
    payloads, to look for."""
    payloads = [EVIL.format(n=n) for n in range(8)]
    beats = {
        "evil": {"proxy_id": payloads[0], "url": payloads[1], "epoch": 1, "ts": time.time(), "nvml": payloads[2],
                 "replicas": [{"replica_id": payloads[3], "version": payloads[4], "state": payloads[5]}],
                 "gpus": [{"uuid": "GPU-" + payloads[6], "name": payloads[6], "utilization_pct": 7}]},
        "broken": {"proxy_id": payloads[7], "url": "x", "epoch": "not a number", "ts": time.time()},
    }
    client = aredis.Redis.from_url(redis_url)
    try:
        for name, beat in beats.items():
            await client.set(keys.proxy_heartbeat(name), orjson.dumps(beat), ex=60)
            await client.zadd(keys.PROXIES, {name: time.time()})
    finally:
        await client.aclose()
    return payloads


def note_hostile_error(stack: Stack) -> str:
    """An error whose text is markup, as a model's or a proxy's message may be."""
    text = '<img src=x onerror=alert("err")>'
    stack.app[status_page.ACTIVITY].failure("acme /v1/<b>m</b>/1", "rid<i>", ApiError(502, "replica_failed", text),
                                            time.time())
    return text


async def test_hostile_proxy_ids_and_error_texts_are_escaped(redis_url: str, state_dir: Path) -> None:
    async with running_stack(redis_url, state_dir, "process") as stack:
        payloads = await put_hostile_heartbeats(redis_url) + [note_hostile_error(stack)]
        for path in ("/status", "/status/fleet"):
            status, text, _ = await fetch(stack, "GET", path, bearer())
            assert status == 200
            for payload in payloads:
                assert payload not in text and html.escape(payload) in text, payload
            assert "<img" not in text and "<b>" not in text and "<i>" not in text
            assert text.count("<script") == (1 if path == "/status" else 0)  # the page's own only


async def test_recent_starts_and_errors_come_from_the_calls(redis_url: str, state_dir: Path) -> None:
    """Needs inference's hooks (status_page.note_outcome, note_failure) wired in ingress/inference.py."""
    async with running_stack(redis_url, state_dir, "process") as stack:
        await echo_stack(stack)
        await stack.deploy("slow", MODELS, "models:slow")
        status, body, _ = await stack.call("slow", "<script>alert(1)</script>")  # float() of it raises
        assert status == 422 and body["type"] == "model_error", body
        await stack.deploy("crash", MODELS, "models:crash")
        status, body, _ = await stack.call("crash", "die")  # the replica is killed under the call
        assert status >= 500, body
        status, text, _ = await fetch(stack, "GET", "/status/fleet", bearer())
        starts = text.split("<h2>Recent starts")[1].split("<h2>Recent errors")[0]
        errors = text.split("<h2>Recent errors")[1]
        assert VERSION in starts and "acme/slow/main/1" in starts and "cold" in starts
        assert any(f"{phase} " in starts for phase in ("create", "start", "ready")), starts
        assert "acme/slow/main/1" in errors and "model_error" in errors
        assert html.escape("<script>alert(1)</script>") in errors and "<script>alert(1)" not in errors
        assert f"acme /v1/crash/latest</td><td>{body['type']}</td>" in errors  # the fleet's failure, 5xx


# ---- in Chromium: what a person sees --------------------------------------------------------------

@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    """A fresh Chromium profile (Debian's chromium, headless): a Playwright BrowserContext."""
    if shutil.which(CHROMIUM) is None:
        missing(f"{CHROMIUM} is not installed (Debian: apt-get install chromium; `make setup` does)")
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        missing("the playwright package is not installed (pip install -e '.[test]')")
    with tempfile.TemporaryDirectory(prefix="lw-chromium-") as profile:
        async with async_playwright() as playwright:
            context = await playwright.chromium.launch_persistent_context(
                profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS, timeout=60_000,
                viewport={"width": 1400, "height": 1000})
            try:
                yield context
            finally:
                await context.close()


def keep(path: Path) -> Path:
    """An artefact a test wrote (under its tmp_path), copied on to ``$LUKEWARM_TEST_ARTIFACTS`` when set."""
    target_dir = os.environ.get("LUKEWARM_TEST_ARTIFACTS")
    if not target_dir:
        return path
    Path(target_dir).mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy2(path, Path(target_dir) / path.name))


def watch_console(page: Any) -> Callable[[], list[str]]:
    """Console messages a broken page would log: CSP refusals, script errors."""
    seen: list[str] = []
    page.on("console", lambda m: seen.append(m.text) if m.type == "error" and "favicon" not in m.text else None)
    page.on("pageerror", lambda e: seen.append(f"page error: {e}"))
    return lambda: [m for m in seen if "Failed to load resource" not in m]


async def body_text(page: Any) -> str:
    return str(await page.inner_text("body"))


async def test_in_chromium_sign_in_shows_the_fleet_and_it_refreshes(
        browser: Any, redis_url: str, state_dir: Path, tmp_path: Path) -> None:
    async with running_stack(redis_url, state_dir, "process") as stack:
        await echo_stack(stack)
        proxy_id = stack.proxies[0].proxy_id
        page = await browser.new_page()
        console = watch_console(page)
        page.set_default_timeout(WAIT_MS)

        answer = await page.goto(stack.url + "/status")
        assert answer is not None and answer.status == 200
        text = await body_text(page)
        assert "Admin token" in text and no_fleet_data(text, stack) and no_fleet_data(await page.content(), stack)

        await page.fill("#token", "not the token")
        async with page.expect_navigation():
            await page.click("button[type=submit]")
        text = await body_text(page)
        assert "not the admin token" in text and no_fleet_data(text, stack) and await page.is_visible("#token")

        await page.fill("#token", ADMIN)
        async with page.expect_navigation():
            await page.click("button[type=submit]")
        assert page.url == stack.url + "/status"
        version = page.locator(".version", has_text=VERSION)
        await version.locator(".state.running").first.wait_for()
        text = await body_text(page)
        assert proxy_id in text and VERSION in text and "running" in await version.inner_text()
        assert ADMIN not in page.url and ADMIN not in await page.content()

        [cookie] = [c for c in await browser.cookies(stack.url + "/status") if c["name"] == status_page.COOKIE]
        assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict" and cookie["path"] == "/status"
        assert status_page.COOKIE not in await page.evaluate("document.cookie")  # out of scripts' reach

        # Refreshes in place: a marker set in this document survives while a new version shows up.
        await page.evaluate("window.lukewarmMarker = 42")
        await stack.deploy("echo", MODELS, "models:echo")
        assert (await stack.call("echo", 2))[0] == 200
        await page.locator(".version", has_text="acme/echo/main/2").locator(".state.running").first.wait_for()
        assert await page.evaluate("window.lukewarmMarker") == 42
        assert "updated" in await page.inner_text("#updated")

        shot = tmp_path / "status-page.png"
        await page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
        keep(shot)
        assert console() == []

        async with page.expect_navigation():
            await page.click("text=Sign out")
        text = await body_text(page)
        assert "Admin token" in text and no_fleet_data(text, stack)
        assert [c for c in await browser.cookies(stack.url + "/status") if c["name"] == status_page.COOKIE] == []


async def test_in_chromium_hostile_texts_show_as_text_and_run_nothing(
        browser: Any, redis_url: str, state_dir: Path, tmp_path: Path) -> None:
    async with running_stack(redis_url, state_dir, "process") as stack:
        payloads = await put_hostile_heartbeats(redis_url) + [note_hostile_error(stack)]
        page = await browser.new_page()
        console = watch_console(page)
        dialogs: list[str] = []
        page.on("dialog", lambda d: dialogs.append(d.message))
        page.set_default_timeout(WAIT_MS)
        await page.goto(stack.url + "/status")
        await page.fill("#token", ADMIN)
        async with page.expect_navigation():
            await page.click("button[type=submit]")
        # After one refresh too: the fragment goes in through innerHTML.
        await page.locator("#updated", has_text="updated").wait_for()
        text = await body_text(page)
        for payload in (payloads[0], payloads[4], payloads[-1]):
            assert payload in text, payload  # shown to the person as the text it is
        assert dialogs == [] and console() == []
        shot = tmp_path / "status-page-hostile.png"
        await page.screenshot(path=str(shot), full_page=True)
        keep(shot)
