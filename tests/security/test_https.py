"""HTTPS at the ingress (DESIGN.md, Contract second part → Trust → HTTPS), tried as a client would.

A real ingress with ``LUKEWARM_TLS_CERT``/``LUKEWARM_TLS_KEY`` (a test CA's certificate), a
real proxy and model (process runtime: the edge is what is under test): a client trusting only
the test CA is answered; one with the default trust store fails verification; plain HTTP on
the port gets no HTTP answer; TLS 1.1 and older are refused. Then the daemon's one-line exits
for half a pair or missing files, and ``lukewarm dev --tls`` as a person runs it.
"""
from __future__ import annotations

import asyncio
import os
import shlex
import ssl
import subprocess
import sys
import warnings
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from shared.tls import DevCerts, make_dev_ca, server_context
from tests.support.stack import MODELS_DIR, REPO_ROOT, Stack, dev_process, free_port, read_until, stop_dev

pytestmark = [pytest.mark.security, pytest.mark.timeout(300)]

IO_TIMEOUT_S = 10.0
REQUEST = b"GET /healthz HTTP/1.1\r\nHost: acme.localhost\r\n\r\n"


@pytest.fixture
def certs(tmp_path: Path) -> DevCerts:
    return make_dev_ca(tmp_path / "tls", "localhost", extra_names=("acme.localhost",))


@pytest.fixture
async def stack(redis_url: str, state_dir: Path, certs: DevCerts) -> AsyncIterator[Stack]:
    s = Stack(redis_url, state_dir, "process")
    try:
        await s.add_proxy()
        # The stack's session trusts the test CA only (ssl.create_default_context(cafile=...)).
        await s.start_ingress(tls_ca=str(certs.ca_cert), tls_cert=str(certs.cert), tls_key=str(certs.key))
        await s.wait_for_proxies(1)
        await s.customer("acme")
        await s.deploy("echo", f"dir:{MODELS_DIR}", entrypoint="models:echo")
        yield s
    finally:
        await s.close()


def legacy_client(ca: Path, max_version: ssl.TLSVersion) -> ssl.SSLContext:
    """A client willing to speak old TLS (OpenSSL 3 needs security level 0 for it)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(str(ca))
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLSVersion.TLSv1 / TLSv1_1 are deprecated names
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = max_version
    return context


async def handshake(port: int, context: ssl.SSLContext, name: str = "localhost") -> str:
    """The TLS version a handshake with 127.0.0.1:port settles on (raises when refused)."""
    _, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname=name), IO_TIMEOUT_S)
    try:
        return str(writer.get_extra_info("ssl_object").version())
    finally:
        writer.close()


async def test_a_client_trusting_only_the_test_ca_is_answered(stack: Stack, certs: DevCerts) -> None:
    assert stack.url.startswith("https://")
    status, body, headers = await stack.call("echo", "over tls")
    assert status == 200, body
    assert body == {"data": {"echo": "over tls"}}
    assert headers["X-Request-Id"]
    # By name too (SNI and the certificate's name check), at TLS 1.2 or newer.
    version = await handshake(stack.port, ssl.create_default_context(cafile=str(certs.ca_cert)), "acme.localhost")
    assert version in ("TLSv1.2", "TLSv1.3")


async def test_a_client_with_the_default_trust_store_fails_verification(stack: Stack) -> None:
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await session.post(f"{stack.url}/v1/echo/latest", data=orjson.dumps({"data": 1}),
                               headers=stack.call_headers(), timeout=aiohttp.ClientTimeout(total=IO_TIMEOUT_S))
    with pytest.raises(ssl.SSLCertVerificationError):
        await handshake(stack.port, ssl.create_default_context())


async def test_plain_http_on_the_tls_port_gets_no_http_answer(stack: Stack) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.port)
    writer.write(REQUEST)
    try:
        answer = await asyncio.wait_for(reader.read(), IO_TIMEOUT_S)
    except ConnectionResetError:
        answer = b""
    finally:
        writer.close()
    assert not answer.startswith(b"HTTP/"), answer[:200]
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientError):
            await session.get(f"http://127.0.0.1:{stack.port}/healthz",
                              timeout=aiohttp.ClientTimeout(total=IO_TIMEOUT_S))


async def test_tls_1_1_and_older_are_refused(stack: Stack, certs: DevCerts) -> None:
    old_versions = (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1)
    # Control: these clients do speak old TLS, with a server that allows it; so a failure
    # against the ingress below is the ingress refusing, not the client unable.
    lax = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    lax.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        lax.minimum_version = ssl.TLSVersion.TLSv1
    lax.load_cert_chain(str(certs.cert), str(certs.key))
    control = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0, ssl=lax)
    try:
        control_port = control.sockets[0].getsockname()[1]
        assert await handshake(control_port, legacy_client(certs.ca_cert, ssl.TLSVersion.TLSv1_1)) == "TLSv1.1"
    finally:
        control.close()
        await control.wait_closed()

    for version in old_versions:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await handshake(stack.port, legacy_client(certs.ca_cert, version))
    assert await handshake(stack.port, legacy_client(certs.ca_cert, ssl.TLSVersion.TLSv1_2)) == "TLSv1.2"
    # And the ingress still answers over modern TLS afterwards.
    assert (await stack.call("echo", "still here"))[0] == 200


def run_ingress(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LUKEWARM_ADMIN_TOKEN": "t", "LUKEWARM_PROXY_SECRET": "s",
           "LUKEWARM_INGRESS_PORT": str(free_port())}
    for name in ("LUKEWARM_TLS_CERT", "LUKEWARM_TLS_KEY"):
        env.pop(name, None)
    return subprocess.run([sys.executable, "-m", "ingress", *args], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=60)


def test_the_daemon_exits_with_one_line_on_half_a_pair_or_missing_files(certs: DevCerts, tmp_path: Path) -> None:
    for args, expected in (
        (("--tls-cert", str(certs.cert)), "needs both"),
        (("--tls-key", str(certs.key)), "needs both"),
        (("--tls-cert", str(tmp_path / "missing.pem"), "--tls-key", str(certs.key)), "cannot read"),
        (("--tls-cert", str(certs.cert), "--tls-key", str(certs.ca_key)), "does not belong"),
    ):
        done = run_ingress(*args)
        assert done.returncode != 0, args
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], (args, done.stderr)
    # The pair is checked the same way whatever loads it.
    assert server_context(str(certs.cert), str(certs.key)).minimum_version == ssl.TLSVersion.TLSv1_2


def test_dev_tls_prints_a_ca_and_a_curl_line_that_answers(redis_url: str, state_dir: Path) -> None:
    port, proxy_port = free_port(), free_port()
    # dev keeps its state (and so the CA) under ~/.cache/lukewarm/dev: a throwaway home here.
    with dev_process("--tls", "--runtime", "process", "--port", str(port), "--proxy-port", str(proxy_port),
                     "--redis-url", redis_url, home=state_dir) as proc:
        lines = read_until(proc, "try:", 180)
        curl = read_until(proc, "curl ", 10)[-1].strip()
        ca = state_dir / ".cache" / "lukewarm" / "dev" / "tls" / "ca.pem"
        assert any(str(ca) in line for line in lines), lines
        assert oct((ca.parent / "key.pem").stat().st_mode & 0o777) == oct(0o600)
        assert f"--cacert {ca}" in curl and f"https://demo.localhost:{port}/v1/hello/latest" in curl, curl
        answer = subprocess.run(shlex.split(curl) + ["--max-time", "60"], capture_output=True, timeout=90)
        assert orjson.loads(answer.stdout) == {"data": {"hello": "world"}}, answer
        # TLS only: the same call in plain HTTP gets no answer.
        plain = subprocess.run(["curl", "-s", "--max-time", "10", f"http://127.0.0.1:{port}/healthz"],
                               capture_output=True, timeout=30)
        assert plain.returncode != 0 and not plain.stdout.startswith(b"{"), plain
        stop_dev(proc)
