"""The site's certificate authority and the certificates it issues (EC P-256).

A site (or the centre) has its own CA; an edge's certificates are signed by the
central CA, so the edge is initialised where ``ca.key`` lives.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared.errors import ConfigError

__all__ = ["DEFAULT_HOSTNAMES", "CertAuthority", "key_pem", "server_names"]

#: the names every broker certificate carries (besides the machine's and --hostname)
DEFAULT_HOSTNAMES = ("localhost", "127.0.0.1", "mosquitto")


@dataclass
class CertAuthority:
    """A CA certificate and, where it was made or loaded with it, its key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey | None  # None when only the CA certificate is known

    @classmethod
    def create(cls, name: str, days: int) -> CertAuthority:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pfmon"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"pfmon CA {name}"),
            ]
        )
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key)

    @classmethod
    def load(cls, folder: Path) -> CertAuthority:
        crt, key_path = folder / "ca.crt", folder / "ca.key"
        try:
            cert = x509.load_pem_x509_certificate(crt.read_bytes())
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{folder}: cannot load the CA (ca.crt, ca.key): {exc}") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError(f"{key_path}: expected an EC private key")
        return cls(cert, key)

    def issue(
        self,
        common_name: str,
        *,
        server: bool,
        sans: Iterable[str] = (),
        days: int,
        also_client: bool = False,
    ) -> tuple[bytes, bytes]:
        """A leaf certificate and its key, PEM. ``also_client``: a server certificate that
        is also a client's (a NATS node dials its peers' routes with it)."""
        if self.key is None:
            raise ConfigError("the CA key is needed to issue certificates")
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        usages = [usage, ExtendedKeyUsageOID.CLIENT_AUTH] if server and also_client else [usage]
        builder = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pfmon"),
                        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                    ]
                )
            )
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), False
            )
        )
        names: list[x509.GeneralName] = []
        for san in dict.fromkeys(sans):
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(san)))
            except ValueError:
                names.append(x509.DNSName(san))
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), key_pem(key)

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)


def server_names(cert_path: Path) -> set[str]:
    """The DNS names and IP addresses a server certificate is valid for."""
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    names = set(san.get_values_for_type(x509.DNSName))
    names |= {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    return names


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """A private key as unencrypted PKCS#8 PEM (the file itself is mode 0600)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
