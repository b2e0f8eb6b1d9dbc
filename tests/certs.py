"""Self-signed certificates for the TLS tests, made on the spot."""

from __future__ import annotations

import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID


def self_signed(folder: Path, name: str = "server", days: float = 30,
                start_days: float = -1) -> tuple[Path, Path]:
    """(certificate, key) for 127.0.0.1 and localhost, valid from start_days for days."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gpuwatch test")])
    import ipaddress

    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + datetime.timedelta(days=start_days))
        .not_valid_after(now + datetime.timedelta(days=start_days + days))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return _write(folder, name, certificate, key)


def certificate_authority(folder: Path, name: str = "ca", days: float = 30) -> tuple[Path, Path]:
    """(certificate, key) of a CA that signs client certificates with signed_by."""
    return self_signed(folder, name, days=days)


def signed_by(folder: Path, authority: tuple[Path, Path], name: str = "client",
              sans: list[str] | None = None, rsa_key: bool = False, days: float = 30
              ) -> tuple[Path, Path]:
    """(certificate, key) signed by authority (from certificate_authority), a leaf with the
    subject alternative names `sans`: "DNS:x", "IP:1.2.3.4", "email:a@b", "URI:spiffe://x"."""
    import ipaddress


    ca_cert = x509.load_pem_x509_certificate(authority[0].read_bytes())
    ca_key = serialization.load_pem_private_key(authority[1].read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey = (
        rsa.generate_private_key(65537, 2048) if rsa_key
        else ec.generate_private_key(ec.SECP256R1()))
    names: list[x509.GeneralName] = []
    for san in sans or []:
        kind, _, value = san.partition(":")
        names.append(x509.DNSName(value) if kind == "DNS"
                     else x509.RFC822Name(value) if kind == "email"
                     else x509.UniformResourceIdentifier(value) if kind == "URI"
                     else x509.IPAddress(ipaddress.ip_address(value)))
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    certificate = builder.sign(ca_key, hashes.SHA256())
    return _write(folder, name, certificate, key)


def _write(folder: Path, name: str, certificate: x509.Certificate,
           key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> tuple[Path, Path]:
    """NAME.crt and NAME.key (PEM, unencrypted PKCS#8) in folder."""
    cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path
