"""Self-signed test certificates made with `cryptography`: a server certificate for localhost and 127.0.0.1 that is
its own CA, and a second, unrelated key (a key that is not the certificate's)."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class SelfSigned:
    """PEM files: `cert` (self-signed, so also the CA a client trusts), its `key`, and `other_key` (not its key)."""

    cert: str
    key: str
    other_key: str


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> str:
    encoding, private = serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8
    path.write_bytes(key.private_bytes(encoding, private, serialization.NoEncryption()))
    return str(path)


def make_self_signed(directory: Path) -> SelfSigned:
    """A certificate for localhost/127.0.0.1 signed by its own key, valid for two days."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    (directory / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return SelfSigned(
        cert=str(directory / "cert.pem"),
        key=_write_key(directory / "key.pem", key),
        other_key=_write_key(directory / "other_key.pem", ec.generate_private_key(ec.SECP256R1())),
    )
