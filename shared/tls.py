"""HTTPS for the ingress: a server context from PEM files, and a local CA for ``lukewarm dev --tls``.

``server_context`` is what ``LUKEWARM_TLS_CERT`` / ``LUKEWARM_TLS_KEY`` turn
into: TLS 1.2 or newer only, and a one-line ``SystemExit`` naming the file
and the problem when the pair cannot be used (a daemon must not start with
a traceback, nor prompt on stdin for a key's password).

``make_dev_ca`` writes a CA and a certificate for ``*.<base domain>`` signed
by it, reusing what an earlier run wrote while it is still valid, so a CA a
person told their browser to trust stays the same across runs.
"""
from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import os
import socket
import ssl
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS = 3650
# Apple's clients refuse server certificates valid for more than 825 days, even from a private CA.
CERT_DAYS = 397
# A file this close to expiry is replaced rather than reused.
RENEW_BEFORE = datetime.timedelta(days=30)
LOOPBACK_IPS = ("127.0.0.1", "::1")


@dataclasses.dataclass(frozen=True)
class DevCerts:
    """Paths of what ``make_dev_ca`` wrote: clients trust ``ca_cert``; the server loads ``cert``/``key``."""

    ca_cert: Path
    ca_key: Path
    cert: Path
    key: Path
    names: tuple[str, ...]


def server_context(cert_path: str, key_path: str) -> ssl.SSLContext:
    """A server-side context speaking TLS 1.2+ with this certificate (chain) and key.

    Raises SystemExit with one line when a file is missing or unreadable, is not
    PEM, the key is encrypted, or the key does not belong to the certificate.
    """
    cert_pem = _read("LUKEWARM_TLS_CERT", cert_path)
    key_pem = _read("LUKEWARM_TLS_KEY", key_path)
    _check_pair(cert_path, cert_pem, key_path, key_pem)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    context.set_alpn_protocols(["http/1.1"])
    try:
        # A password callback that refuses: OpenSSL would otherwise prompt on the terminal.
        context.load_cert_chain(cert_path, key_path, password=_no_password)
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise SystemExit(f"TLS: cannot load {cert_path} with {key_path}: {_reason(exc)}") from None
    return context


def context_from_files(cert_path: str, key_path: str) -> ssl.SSLContext | None:
    """``server_context`` when both are given, None when neither; one of the two alone is a mistake."""
    if bool(cert_path) != bool(key_path):
        given, missing = ("LUKEWARM_TLS_CERT", "LUKEWARM_TLS_KEY") if cert_path else \
            ("LUKEWARM_TLS_KEY", "LUKEWARM_TLS_CERT")
        raise SystemExit(f"{given} is set but {missing} is not: HTTPS needs both (--tls-cert and --tls-key)")
    return server_context(cert_path, key_path) if cert_path else None


def _no_password() -> bytes:
    raise ValueError("the key is encrypted; give an unencrypted key")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return str(exc.reason or exc).lower().replace("_", " ")
    return str(getattr(exc, "strerror", None) or exc)


def _read(name: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SystemExit(f"{name}: cannot read {path}: {exc.strerror or exc}") from None


def _check_pair(cert_path: str, cert_pem: bytes, key_path: str, key_pem: bytes) -> None:
    """Name the actual problem; OpenSSL's own errors ("PEM lib") say little."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise SystemExit(f"LUKEWARM_TLS_CERT: {cert_path} is not a PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise SystemExit(f"LUKEWARM_TLS_KEY: {key_path} is encrypted; give an unencrypted key") from None
    except ValueError:
        raise SystemExit(f"LUKEWARM_TLS_KEY: {key_path} is not a PEM private key") from None
    public = key.public_key().public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    if public != cert.public_key().public_bytes(serialization.Encoding.DER,
                                                serialization.PublicFormat.SubjectPublicKeyInfo):
        raise SystemExit(f"TLS: the key {key_path} does not belong to the certificate {cert_path}")


# ---- a local CA for development --------------------------------------------------


def dev_names(base_domain: str, extra: Sequence[str] = ()) -> tuple[str, ...]:
    """DNS names the dev certificate covers: the wildcard, the domain itself, localhost, ``extra``.

    OpenSSL (hence curl and Python) ignores a wildcard directly under a single-label
    name (``*.localhost``), so hosts a client will really use are listed by name in ``extra``.
    """
    names = [f"*.{base_domain}", base_domain, "localhost", *extra]
    return tuple(dict.fromkeys(n.lower() for n in names))


def make_dev_ca(directory: str | Path, base_domain: str, extra_names: Sequence[str] = (),
                now: datetime.datetime | None = None) -> DevCerts:
    """A CA and a certificate for ``*.<base_domain>``, ``<base_domain>``, localhost, 127.0.0.1, ::1.

    Idempotent: a CA that is still valid is reused (clients that trust it keep
    trusting); the certificate is reused when signed by that CA, still valid and
    covering the same names, else reissued. Keys are written 0600, every file
    atomically (a crash never leaves half a key). Blocking (file I/O, key generation).
    ``now`` (UTC; the clock when None) is when validity is judged and new files start.
    """
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    certs = DevCerts(root / "ca.pem", root / "ca-key.pem", root / "cert.pem", root / "key.pem",
                     dev_names(base_domain, extra_names))
    now = now or datetime.datetime.now(datetime.timezone.utc)
    ca = _load_valid_ca(certs, now)
    if ca is None:
        ca = _new_ca(now)
        _write(certs.ca_key, _key_pem(ca[1]), private=True)
        _write(certs.ca_cert, ca[0].public_bytes(serialization.Encoding.PEM))
    if not _leaf_is_valid(certs, ca[0], now):
        cert, key = _new_leaf(ca, certs.names, now)
        _write(certs.key, _key_pem(key), private=True)
        _write(certs.cert, cert.public_bytes(serialization.Encoding.PEM))
    return certs


def _new_ca(now: datetime.datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Lukewarm development"),
                      x509.NameAttribute(NameOID.COMMON_NAME, f"Lukewarm dev CA ({socket.gethostname()})"[:64])])
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _new_leaf(ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], names: Sequence[str],
              now: datetime.datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    alt: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    alt += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in LOOPBACK_IPS]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def _load_valid_ca(certs: DevCerts, now: datetime.datetime
                   ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    pair = _load_pair(certs.ca_cert, certs.ca_key)
    if pair is None or not _fresh(pair[0], now):
        return None
    try:
        constraints = pair[0].extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return None
    return pair if constraints.ca else None


def _leaf_is_valid(certs: DevCerts, ca_cert: x509.Certificate, now: datetime.datetime) -> bool:
    pair = _load_pair(certs.cert, certs.key)
    if pair is None or not _fresh(pair[0], now):
        return False
    cert = pair[0]
    try:
        cert.verify_directly_issued_by(ca_cert)
        alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
        return False
    return set(alt.get_values_for_type(x509.DNSName)) == set(certs.names)


def _load_pair(cert_path: Path, key_path: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    """The certificate and its key, or None when either is missing, unreadable or they do not match."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        return None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        return None
    return cert, key


def _fresh(cert: x509.Certificate, now: datetime.datetime) -> bool:
    return cert.not_valid_before_utc <= now and now + RENEW_BEFORE < cert.not_valid_after_utc


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: Path, data: bytes, private: bool = False) -> None:
    """Write via a temporary file and rename; a private file is 0600 from its creation on."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    mode = 0o600 if private else 0o644
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as out:
        # os.open's mode applies only when it creates the file: a leftover tmp file keeps its own.
        os.fchmod(out.fileno(), mode)
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
