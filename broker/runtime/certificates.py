"""A local certificate authority for the embedded runtime (``edgesync up``, tests).

``edgesync up`` runs NATS with TLS on, like production: this module makes a
private CA under ``<state>/tls`` once (kept across restarts, so clients that
trust it keep trusting it), and issues the server certificate for the loopback
names from it (and client certificates where mutual TLS is wanted). Keys are
EC P-256; every key and certificate file is 0600 and the directory 0700.

Production may bring its own PKI; ``deploy/secrets/generate.py`` uses this CA
for a cluster that has none (the NATS server and route certificate).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from broker.durable_files import write_private

__all__ = [
    "LOOPBACK_NAMES",
    "CertificateAuthority",
    "TlsFiles",
]

_CA_DAYS = 3650
_LEAF_DAYS = 825  # the longest lifetime clients such as macOS still accept for a leaf
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """A certificate, its key, and the CA that vouches for it."""

    cert_file: Path
    key_file: Path
    ca_file: Path


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class CertificateAuthority:
    """A private CA kept in ``directory`` (``ca.pem``, ``ca.key``); created on first use."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory).absolute()
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.directory.chmod(0o700)
        self.ca_file = self.directory / "ca.pem"
        self._key_file = self.directory / "ca.key"
        if not (self.ca_file.exists() and self._key_file.exists()):
            self._create()
        key = serialization.load_pem_private_key(self._key_file.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        self._key = key
        self._cert = x509.load_pem_x509_certificate(self.ca_file.read_bytes())

    def _create(self) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgesync local CA")])
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=_CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256())
        )
        write_private(self._key_file, _key_pem(key))
        write_private(self.ca_file, cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, name: str, *, hosts: tuple[str, ...] = LOOPBACK_NAMES,
              client: bool = False, route: bool = False) -> TlsFiles:
        """Issue (or re-issue) ``<name>.pem`` / ``<name>.key`` signed by this CA.

        Args:
            name: file stem and common name.
            hosts: DNS names and IP addresses for a server certificate.
            client: a client certificate (for mutual TLS) instead of a server one.
            route: a server certificate that is a client one too: a nats-server
                cluster node dials its peers' routes (``verify: true``) with it.
        """
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self._cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=_LEAF_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.CLIENT_AUTH] if client
                else [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH] if route
                else [ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        )
        if not client:
            alt: list[x509.GeneralName] = []
            for host in hosts:
                try:
                    alt.append(x509.IPAddress(ipaddress.ip_address(host)))
                except ValueError:
                    alt.append(x509.DNSName(host))
            builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        files = TlsFiles(cert_file=self.directory / f"{name}.pem",
                         key_file=self.directory / f"{name}.key", ca_file=self.ca_file)
        write_private(files.key_file, _key_pem(key))
        write_private(files.cert_file, cert.public_bytes(serialization.Encoding.PEM))
        return files
