"""Certificates for a test federation: a CA, the server's TLS certificate, and a key pair per site (its
identity for the site list, in OpenSSH format: both transports, and Flower's node authentication, read it).
Real deployments bring their own CA and certificates, which the server (:func:`read_server_certificates`) and a
site (:func:`read_ca`) read here, once, for either transport."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ..core.errors import JobError, Source
from ..core.files import atomic_write

DAYS = 365


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _certificate(subject: str, public_key, issuer: x509.Name, signer, *, ca: bool, hosts=(),
                 days: int = DAYS) -> x509.Certificate:
    until = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=days)
    since = min(datetime.datetime.now(datetime.UTC), until) - datetime.timedelta(minutes=5)
    builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(issuer).public_key(public_key).serial_number(x509.random_serial_number())
               .not_valid_before(since).not_valid_after(until)
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if hosts:
        names = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(signer, hashes.SHA256())


def make_certificates(folder: Path, sites: list[str], hosts: list[str], days: int = DAYS) -> list[Path]:
    """Write ``ca.crt``, ``server.crt``/``server.key`` (valid for ``hosts`` and ``days`` days: a negative number
    makes an expired one), ``sites/NAME.key``/``.pub`` and ``sites.csv`` into ``folder``; returns the files
    written."""
    folder = Path(folder)
    (folder / "sites").mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "autocnnp federation test CA")])
    ca = _certificate("autocnnp federation test CA", ca_key.public_key(), ca_name, ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP384R1())
    server = _certificate(hosts[0], server_key.public_key(), ca_name, ca_key, ca=False, hosts=hosts, days=days)
    files = {"ca.crt": ca.public_bytes(serialization.Encoding.PEM),
             "server.crt": server.public_bytes(serialization.Encoding.PEM), "server.key": _pem_key(server_key)}
    listing = ["# NAME,PUBLIC_KEY_FILE: the sites the server admits (autocnnp federation server --sites)"]
    for name in sites:
        key = ec.generate_private_key(ec.SECP384R1())
        files[f"sites/{name}.key"] = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                       serialization.NoEncryption())
        files[f"sites/{name}.pub"] = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                                   serialization.PublicFormat.OpenSSH)
        listing.append(f"{name},sites/{name}.pub")
    files["sites.csv"] = ("\n".join(listing) + "\n").encode()
    written = []
    for name, data in files.items():
        atomic_write(folder / name, data)
        if name.endswith(".key"):
            (folder / name).chmod(0o600)
        written.append(folder / name)
    return written


def read_server_certificates(certs: tuple[Path, Path, Path] | None) -> tuple[bytes, bytes, bytes] | None:
    """The server's ``--certs`` (ca.crt, server.crt, server.key) as bytes, None without TLS; a JobError naming
    the file that cannot be read."""
    if certs is None:
        return None
    try:
        ca, certificate, key = (Path(p).read_bytes() for p in certs)
    except OSError as exc:
        raise JobError(Source(Path("."), text="autocnnp federation server --certs"),
                       f"{exc.filename} cannot be read ({exc.strerror})",
                       "give the folder holding ca.crt, server.crt and server.key") from None
    return ca, certificate, key


@dataclass(frozen=True)
class CaCertificate:
    """The CA certificate a site trusts the server by (``--ca``), read once: its file (for Flower's SuperNode,
    which reads it itself) and its PEM bytes (for the probe and Flower's client in this process)."""

    file: Path
    pem: bytes


def read_ca(path: Path) -> CaCertificate:
    """The site's ``--ca`` file; a JobError when it cannot be read."""
    try:
        return CaCertificate(Path(path), Path(path).read_bytes())
    except OSError as exc:
        raise JobError(Source(Path("."), text="autocnnp federation site --ca"),
                       f"the CA certificate {path} cannot be read ({exc.strerror})",
                       "give the ca.crt the federation's operator sent") from None
