"""A throw-away PKI for TLS tests: a CA and leaf certificates made with `cryptography`.

    paths = make_pki(tmp_path)   # ca, server_cert/server_key, client_cert/client_key
    rogue = make_pki(tmp_path / "rogue")   # another CA nobody trusts

Leaf certificates are for `localhost` and 127.0.0.1 (SAN) and valid for an hour.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def issue(
    subject: str,
    issuer_key: ec.EllipticCurvePrivateKey | None,
    issuer: x509.Name | None,
    *,
    ca: bool,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A key and a certificate for `subject`, self-signed when `issuer_key` is None."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name(subject))
        .issuer_name(issuer or name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    cert = builder.sign(issuer_key or key, hashes.SHA256())
    return key, cert


def write_pair(
    path: Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate
) -> tuple[Path, Path]:
    """`<path>.key` (PKCS#8 PEM) and `<path>.pem`; returns (key path, cert path)."""
    key_path, cert_path = path.with_suffix(".key"), path.with_suffix(".pem")
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def make_pki(directory: Path, leaves: tuple[str, ...] = ("server", "client")) -> dict[str, Path]:
    """A CA (`ca`) and, per leaf name, `<leaf>_key` and `<leaf>_cert` signed by it."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = issue("finsight-test-ca", None, None, ca=True)
    _, ca_pem = write_pair(directory / "ca", ca_key, ca_cert)
    out = {"ca": ca_pem}
    for who in leaves:
        key, cert = issue("localhost", ca_key, ca_cert.subject, ca=False)
        out[f"{who}_key"], out[f"{who}_cert"] = write_pair(directory / who, key, cert)
    return out
