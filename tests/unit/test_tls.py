"""shared.tls: the server context from PEM files (and its one-line refusals), and the dev CA."""
from __future__ import annotations

import asyncio
import datetime
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from shared.tls import DevCerts, context_from_files, make_dev_ca, server_context

UTC = datetime.timezone.utc


@pytest.fixture
def certs(tmp_path: Path) -> DevCerts:
    return make_dev_ca(tmp_path / "tls", "app.example.com", extra_names=("demo.localhost",))


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def sans(path: Path) -> tuple[set[str], set[str]]:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return set(alt.get_values_for_type(x509.DNSName)), {str(ip) for ip in alt.get_values_for_type(x509.IPAddress)}


def test_dev_ca_writes_a_ca_and_a_wildcard_certificate_with_private_keys_0600(certs: DevCerts) -> None:
    for path in (certs.ca_cert, certs.ca_key, certs.cert, certs.key):
        assert path.exists(), path
    assert mode(certs.ca_key) == 0o600 and mode(certs.key) == 0o600
    assert mode(certs.ca_cert.parent) == 0o700
    dns, ips = sans(certs.cert)
    assert dns == {"*.app.example.com", "app.example.com", "localhost", "demo.localhost"}
    assert ips == {"127.0.0.1", "::1"}
    leaf = x509.load_pem_x509_certificate(certs.cert.read_bytes())
    leaf.verify_directly_issued_by(x509.load_pem_x509_certificate(certs.ca_cert.read_bytes()))
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False


def test_dev_ca_is_idempotent(certs: DevCerts) -> None:
    before = {p: p.read_bytes() for p in (certs.ca_cert, certs.ca_key, certs.cert, certs.key)}
    again = make_dev_ca(certs.ca_cert.parent, "app.example.com", extra_names=("demo.localhost",))
    assert again == certs
    assert {p: p.read_bytes() for p in before} == before


def test_dev_ca_keeps_the_ca_and_reissues_a_certificate_that_no_longer_fits(certs: DevCerts) -> None:
    ca = certs.ca_cert.read_bytes()
    old_leaf = certs.cert.read_bytes()
    other = make_dev_ca(certs.ca_cert.parent, "other.test")
    assert certs.ca_cert.read_bytes() == ca, "a CA clients already trust is kept"
    assert other.cert.read_bytes() != old_leaf
    assert sans(other.cert)[0] == {"*.other.test", "other.test", "localhost"}

    other.key.write_bytes(b"garbage")  # a damaged key: reissued, never served
    repaired = make_dev_ca(certs.ca_cert.parent, "other.test")
    assert repaired.ca_cert.read_bytes() == ca
    serialization.load_pem_private_key(repaired.key.read_bytes(), password=None)
    assert mode(repaired.key) == 0o600


def test_dev_ca_replaces_an_expired_ca(tmp_path: Path) -> None:
    long_ago = datetime.datetime.now(UTC) - datetime.timedelta(days=4000)
    old = make_dev_ca(tmp_path, "localhost", now=long_ago)
    old_ca = old.ca_cert.read_bytes()
    new = make_dev_ca(tmp_path, "localhost")
    assert new.ca_cert.read_bytes() != old_ca
    ca = x509.load_pem_x509_certificate(new.ca_cert.read_bytes())
    assert ca.not_valid_after_utc > datetime.datetime.now(UTC) + datetime.timedelta(days=365)
    x509.load_pem_x509_certificate(new.cert.read_bytes()).verify_directly_issued_by(ca)


def test_server_context_is_tls12_or_newer(certs: DevCerts) -> None:
    context = server_context(str(certs.cert), str(certs.key))
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.protocol == ssl.PROTOCOL_TLS_SERVER


async def test_a_client_trusting_only_the_dev_ca_verifies_the_certificate(certs: DevCerts) -> None:
    server = await asyncio.start_server(_answer_ok, "127.0.0.1", 0,
                                        ssl=server_context(str(certs.cert), str(certs.key)))
    port = server.sockets[0].getsockname()[1]
    try:
        trusting = ssl.create_default_context(cafile=str(certs.ca_cert))
        for name in ("demo.localhost", "x.app.example.com", "app.example.com", "localhost", "127.0.0.1"):
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", port, ssl=trusting, server_hostname=name), 10)
            assert await asyncio.wait_for(reader.read(), 10) == b"ok", name
            writer.close()
        # A name outside the certificate fails verification even with the CA trusted.
        with pytest.raises(ssl.SSLCertVerificationError):
            await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, ssl=trusting,
                                                          server_hostname="evil.example.org"), 10)
    finally:
        server.close()
        await server.wait_closed()


async def _answer_ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"ok")
    await writer.drain()
    writer.close()


def one_line_exit(excinfo: pytest.ExceptionInfo[SystemExit]) -> str:
    message = str(excinfo.value.code)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_missing_or_unreadable_files_exit_with_one_line(certs: DevCerts, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as excinfo:
        server_context(str(tmp_path / "nope.pem"), str(certs.key))
    assert "LUKEWARM_TLS_CERT" in one_line_exit(excinfo) and "nope.pem" in one_line_exit(excinfo)
    with pytest.raises(SystemExit) as excinfo:
        server_context(str(certs.cert), str(tmp_path / "nokey.pem"))
    assert "LUKEWARM_TLS_KEY" in one_line_exit(excinfo) and "nokey.pem" in one_line_exit(excinfo)
    with pytest.raises(SystemExit) as excinfo:  # a directory: unreadable as a file, even for root
        server_context(str(certs.cert), str(tmp_path))
    assert "cannot read" in one_line_exit(excinfo)


def test_wrong_contents_exit_with_one_line_naming_the_problem(certs: DevCerts, tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(SystemExit) as excinfo:
        server_context(str(junk), str(certs.key))
    assert "not a PEM certificate" in one_line_exit(excinfo)
    with pytest.raises(SystemExit) as excinfo:
        server_context(str(certs.cert), str(junk))
    assert "not a PEM private key" in one_line_exit(excinfo)

    # The CA's key with the server's certificate: both valid, not a pair.
    with pytest.raises(SystemExit) as excinfo:
        server_context(str(certs.cert), str(certs.ca_key))
    assert "does not belong" in one_line_exit(excinfo)

    # An encrypted key is refused, never prompted for on the terminal.
    key = serialization.load_pem_private_key(certs.key.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    encrypted = tmp_path / "encrypted.pem"
    encrypted.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.BestAvailableEncryption(b"secret")))
    with pytest.raises(SystemExit) as excinfo:
        server_context(str(certs.cert), str(encrypted))
    assert "encrypted" in one_line_exit(excinfo)


def test_cert_and_key_come_both_or_neither(certs: DevCerts) -> None:
    assert context_from_files("", "") is None
    assert isinstance(context_from_files(str(certs.cert), str(certs.key)), ssl.SSLContext)
    for cert, key in ((str(certs.cert), ""), ("", str(certs.key))):
        with pytest.raises(SystemExit) as excinfo:
            context_from_files(cert, key)
        assert "needs both" in one_line_exit(excinfo)


def test_dev_tls_makes_a_ca_in_the_state_dir_or_uses_the_given_files(tmp_path: Path) -> None:
    from lukewarm.dev import DevOptions, curl_line, dev_tls

    made = dev_tls(DevOptions(tls=True), str(tmp_path))
    assert Path(made.ca) == tmp_path / "tls" / "ca.pem"
    assert "demo.localhost" in sans(Path(made.cert))[0], "OpenSSL ignores *.localhost: the demo host is named"
    assert dev_tls(DevOptions(tls_cert="/c.pem", tls_key="/k.pem"), str(tmp_path)) == \
        type(made)("/c.pem", "/k.pem", "")
    assert dev_tls(DevOptions(), str(tmp_path)).cert == ""
    with pytest.raises(SystemExit):
        dev_tls(DevOptions(tls=True, tls_cert="/c.pem", tls_key="/k.pem"), str(tmp_path))

    line = curl_line("0.0.0.0", 8443, "lw_key", https=True, ca=made.ca)
    assert f"--cacert {made.ca}" in line and "--resolve demo.localhost:8443:127.0.0.1" in line
    assert line.endswith("https://demo.localhost:8443/v1/hello/latest")
    assert "--cacert" not in curl_line("127.0.0.1", 8443, "k", https=True)
    assert "http://127.0.0.1:8080/" in curl_line("127.0.0.1", 8080, "k")
