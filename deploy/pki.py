"""Certificates and node keys for a radfed deployment, made with `cryptography` (no openssl, no ssh-keygen).

- a CA (``pki/ca.crt``, ``pki/ca.key``) and the SuperLink's TLS certificate signed by it
  (``pki/server.crt``, ``pki/server.key``; SAN DNS:localhost, IP:127.0.0.1 and any extra host names);
- per site an ECDSA P-384 key pair in OpenSSH format (``keys/<site>``, ``keys/<site>.pub``), the form
  ``flower-supernode --auth-supernode-private-key`` and ``flwr supernode register`` read.

Nothing is ever overwritten: an existing file is kept (and reported), a new one is created exclusively.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CURVE = ec.SECP384R1
SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
DEFAULT_HOSTS = ("localhost", "127.0.0.1")
CA_DAYS, SERVER_DAYS = 3650, 825


@dataclass
class Provisioned:
    created: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)


def pki_dir(out: Path) -> Path:
    return out / "pki"


def key_path(out: Path, site: str) -> Path:
    return out / "keys" / site


def check_site_name(site: str) -> str:
    if not SITE_NAME.match(site):
        raise ValueError(f"site name {site!r}: use letters, digits, '.', '_' or '-' (at most 64 characters)")
    return site


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` with ``mode``; fails if it exists (never overwrites)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san(hosts: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys([*DEFAULT_HOSTS, *hosts]):  # keep order, drop repeats
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def san_hosts(cert_path: Path) -> list[str]:
    """The DNS names and IP addresses a certificate is valid for."""
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [*san.get_values_for_type(x509.DNSName), *(str(ip) for ip in san.get_values_for_type(x509.IPAddress))]


def _make_ca(pki: Path, result: Provisioned) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    ca_key_path, ca_cert_path = pki / "ca.key", pki / "ca.crt"
    if ca_cert_path.exists() or ca_key_path.exists():
        if not (ca_cert_path.exists() and ca_key_path.exists()):
            raise FileExistsError(f"{pki} holds only one of ca.crt / ca.key: restore the other or remove both")
        result.kept += [ca_cert_path, ca_key_path]
        key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return key, x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
    key = ec.generate_private_key(CURVE())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "radfed federation"),
                      x509.NameAttribute(NameOID.COMMON_NAME, "radfed federation CA")])
    now = dt.datetime.now(dt.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA384()))
    _write_new(ca_key_path, _pem_key(key), 0o600)
    _write_new(ca_cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    result.created += [ca_cert_path, ca_key_path]
    return key, cert


def _make_server_cert(pki: Path, hosts: list[str], ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate,
                      result: Provisioned) -> None:
    key_file, cert_file = pki / "server.key", pki / "server.crt"
    if cert_file.exists() or key_file.exists():
        if not (cert_file.exists() and key_file.exists()):
            raise FileExistsError(f"{pki} holds only one of server.crt / server.key: remove it to issue a new pair")
        missing = [h for h in dict.fromkeys([*DEFAULT_HOSTS, *hosts]) if h not in san_hosts(cert_file)]
        if missing:
            raise FileExistsError(f"{cert_file} exists and is not valid for {', '.join(missing)}; it is kept. "
                                  f"To reissue it, remove {cert_file} and {key_file} and provision again")
        result.kept += [cert_file, key_file]
        return
    key = ec.generate_private_key(CURVE())
    now = dt.datetime.now(dt.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "radfed federation"),
                         x509.NameAttribute(NameOID.COMMON_NAME, (hosts or ["localhost"])[0])])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=SERVER_DAYS))
            .add_extension(x509.SubjectAlternativeName(_san(hosts)), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_agreement=True, key_cert_sign=False,
                                         crl_sign=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA384()))
    _write_new(key_file, _pem_key(key), 0o600)
    _write_new(cert_file, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    result.created += [cert_file, key_file]


def make_site_key(out: Path, site: str, result: Provisioned) -> None:
    """ECDSA P-384 key pair in OpenSSH format for one SuperNode; an existing pair is kept."""
    private, public = key_path(out, check_site_name(site)), key_path(out, site).with_suffix(".pub")
    if private.exists() or public.exists():
        if not (private.exists() and public.exists()):
            raise FileExistsError(f"only one of {private} / {public} exists: restore the other or remove both")
        result.kept += [private, public]
        return
    key = ec.generate_private_key(CURVE())
    openssh_private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                        serialization.NoEncryption())
    openssh_public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write_new(private, openssh_private, 0o600)
    _write_new(public, openssh_public + f" radfed-site-{site}\n".encode(), 0o644)
    result.created += [private, public]


def provision(out: Path, sites: list[str], hosts: list[str] | None = None) -> Provisioned:
    """CA + SuperLink certificate (reused if present) and one key pair per site (kept if present)."""
    for site in sites:
        check_site_name(site)
    result = Provisioned()
    pki = pki_dir(out)
    ca_key, ca_cert = _make_ca(pki, result)
    _make_server_cert(pki, list(hosts or []), ca_key, ca_cert, result)
    for site in sites:
        make_site_key(out, site, result)
    return result
