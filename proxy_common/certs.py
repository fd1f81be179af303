"""X.509 material with `cryptography`: a CA, server and client certificates.

SHELL (writes files). Used by the demo, the tests and the `certs` subcommand. Keys are
ECDSA P-256; private keys are written with mode 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Issued:
    cert_pem: bytes
    key_pem: bytes
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _name(common_name: str, organization: str = "") -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    return x509.Name(attrs)


def make_ca(common_name: str = "konnectivity-ca", *, days: int = 3650) -> Issued:
    key = _key()
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _pem_key(key), cert, key)


def issue(
    ca: Issued,
    common_name: str,
    *,
    sans: tuple[str, ...] = (),
    server: bool = False,
    client: bool = False,
    organization: str = "",
    days: int = 365,
    not_before: dt.datetime | None = None,
) -> Issued:
    """A leaf certificate signed by `ca`. SANs that parse as IP addresses become IP SANs."""
    key = _key()
    start = not_before or dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + ([ExtendedKeyUsageOID.CLIENT_AUTH] if client else [])
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name, organization))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_encipherment=True, key_cert_sign=False, crl_sign=False,
                content_commitment=False, data_encipherment=False, key_agreement=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
    )
    if usages:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    if sans:
        names: list[x509.GeneralName] = []
        for san in sans:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(san)))
            except ValueError:
                names.append(x509.DNSName(san))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca.key, hashes.SHA256())
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _pem_key(key), cert, key)


def load_ca(cert_path: str | Path, key_path: str | Path) -> Issued:
    cert_pem, key_pem = Path(cert_path).read_bytes(), Path(key_path).read_bytes()
    key = serialization.load_pem_private_key(key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError("only ECDSA CA keys are supported")
    return Issued(cert_pem, key_pem, x509.load_pem_x509_certificate(cert_pem), key)


def write_secret(path: Path, data: bytes) -> None:
    """Write a file readable by its owner only (created that way, never widened)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(path, 0o600)


def write_pair(directory: Path, stem: str, issued: Issued) -> tuple[Path, Path]:
    """Write `<stem>.crt` (0644) and `<stem>.key` (0600); return their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
    cert_path.write_bytes(issued.cert_pem)
    os.chmod(cert_path, 0o644)
    write_secret(key_path, issued.key_pem)
    return cert_path, key_path


@dataclass(frozen=True)
class DemoPki:
    """Paths of a throw-away PKI for one server and one agent on loopback."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    agent_cert: Path
    agent_key: Path
    client_cert: Path
    client_key: Path


def make_demo_pki(directory: Path, *, hosts: tuple[str, ...] = ("127.0.0.1", "localhost", "::1")) -> DemoPki:
    ca = make_ca()
    ca_cert, _ = write_pair(directory, "ca", ca)
    server_cert, server_key = write_pair(directory, "server", issue(ca, "konnectivity-server", sans=hosts, server=True))
    agent_cert, agent_key = write_pair(directory, "agent", issue(ca, "konnectivity-agent", client=True))
    client_cert, client_key = write_pair(
        directory, "client", issue(ca, "system:konnectivity-client", client=True)
    )
    return DemoPki(ca_cert, server_cert, server_key, agent_cert, agent_key, client_cert, client_key)
