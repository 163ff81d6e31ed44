"""A private certificate authority for the local stack and tests: one CA, server certificates
for ``127.0.0.1``/``localhost`` signed by it, all PEM files.

This is the module that imports ``cryptography``. The files are laid out so both consumers of
the stack read them directly: Kafka's ``PEM`` keystore type (KIP-651: key and certificate chain
in one file) and nbdkit's ``--tls-certificates=DIR`` (GnuTLS: ``ca-cert.pem``,
``server-cert.pem``, ``server-key.pem``). Clients trust ``ca-cert.pem`` and nothing else.
Keys are EC P-256 (generated in milliseconds) and never leave the directory, which is 0700.
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
from cryptography.x509.oid import NameOID

#: Long enough that a dev stack never sees its certificate expire, short of "forever".
VALIDITY = dt.timedelta(days=825)


@dataclass(frozen=True)
class CertFiles:
    """The PEM files of one CA and its server certificate, in one directory."""

    dir: Path

    @property
    def ca_cert(self) -> Path:
        return self.dir / "ca-cert.pem"

    @property
    def server_cert(self) -> Path:
        return self.dir / "server-cert.pem"

    @property
    def server_key(self) -> Path:
        return self.dir / "server-key.pem"

    @property
    def server_keystore(self) -> Path:
        """Key, then certificate, then CA certificate: Kafka's ``ssl.keystore.type=PEM``."""
        return self.dir / "server-keystore.pem"

    def complete(self) -> bool:
        paths = (self.ca_cert, self.server_cert, self.server_key, self.server_keystore)
        return all(p.is_file() for p in paths)


def _name(common_name: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cbtstream dev stack"),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    tmp.replace(path)


def make_certs(directory: Path, *, ca_name: str = "cbtstream dev CA",
               hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> CertFiles:
    """Create a CA and a server certificate for ``hosts`` in ``directory`` (overwrites)."""
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(ca_name))
        .issuer_name(_name(ca_name))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                          content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, encipher_only=False,
                          decipher_only=False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    alt_names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            alt_names.append(x509.DNSName(h))
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    files = CertFiles(directory)
    _write(files.ca_cert, ca_cert.public_bytes(pem))
    _write(files.server_cert, cert.public_bytes(pem) + ca_cert.public_bytes(pem))
    _write(files.server_key, key_pem, 0o600)
    _write(files.server_keystore,
           key_pem + cert.public_bytes(pem) + ca_cert.public_bytes(pem), 0o600)
    return files


def ensure_certs(directory: Path) -> CertFiles:
    """The certificates in ``directory``, created on first use (idempotent)."""
    files = CertFiles(directory)
    return files if files.complete() else make_certs(directory)
