"""Who may join a federation, and with what job. The server lists the sites' public keys (``sites.csv``, one
``NAME,PUBLIC_KEY_FILE`` a line); a site proves it holds the private half: with the grpc transport it signs
the server's challenge (:class:`SignedChallenge`), with the deployment transport Flower's node authentication
checks it (:class:`FlowerNodes`). Keys are elliptic-curve keys in OpenSSH format (as Flower reads them) or PEM.
A site's job must agree with the server's on what makes the parameters exchangeable (:func:`agreement`)."""

from __future__ import annotations

import base64
import json
import secrets
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from .. import __version__
from ..core.errors import ExitCode, JobError, Location, Source


class Unreachable(JobError):
    """The federation server cannot be reached (a wrong address, a foreign certificate, a server gone)."""

    exit_code = ExitCode.FAILED


class Refused(JobError):
    """The server refused this site (exit 2: bad input)."""

    exit_code = ExitCode.BAD_INPUT


def refused(client, address: str) -> None:
    """Raise JobError if the server refused ``client`` (a site's Flower client), saying why."""
    if client.verdict:
        raise JobError(Source(Path("."), text=f"federation server {address}"),
                       f"site {client.name} was refused: {client.verdict}", "make this site's job agree with the "
                       "server's, or ask the operator to list its public key")


def agreement(job) -> dict[str, str]:
    """What a site's job must share with the server's: autocnnp version, framework, architecture and its
    parameters, data format and modalities (text values, as a site sends them)."""
    gen, spec = job.generator, job.spec
    arch = gen.action("architecture_injection")
    modalities = next((s.value for s in spec.data_params if s.name == "modalities"), "all")
    return {"autocnnp version": __version__, "framework": gen.framework, "architecture": arch.entry.name,
            "architecture parameters": json.dumps(arch.recorded(), sort_keys=True, default=str),
            "data format": str(spec.data_format.name), "modalities": str(modalities)}


def differences(ours: dict[str, str], theirs: dict[str, str], whose: str) -> list[str]:
    """``NAME: X here, Y at WHOSE`` for every entry that differs."""
    return [f"{key}: {ours.get(key)!s} here, {theirs.get(key)!s} at {whose}" for key in sorted({*ours, *theirs})
            if ours.get(key) != theirs.get(key)]


def _read_key(path: Path, private: bool):
    """The key in ``path``, OpenSSH format or PEM."""
    data = Path(path).read_bytes()
    if private:
        if b"OPENSSH PRIVATE KEY" in data:
            return serialization.load_ssh_private_key(data, password=None)
        return serialization.load_pem_private_key(data, password=None)
    if data.lstrip().startswith(b"ecdsa-"):
        return serialization.load_ssh_public_key(data)
    return serialization.load_pem_public_key(data)


def load_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = _read_key(path, private=True)
    except (OSError, ValueError) as exc:
        raise JobError(Location(Path(path)), f"the site key cannot be read ({exc})",
                       "give the private key `autocnnp federation certs` made for this site") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise JobError(Location(Path(path)), "the site key is no elliptic-curve key", "make one with "
                       "`autocnnp federation certs` or `openssl ecparam -genkey -name secp384r1`")
    return key


def sign(key: ec.EllipticCurvePrivateKey, challenge: str) -> str:
    return base64.b64encode(key.sign(challenge.encode(), ec.ECDSA(hashes.SHA256()))).decode()


def read_site_list(path: Path) -> dict[str, ec.EllipticCurvePublicKey]:
    """``sites.csv``: ``NAME,PUBLIC_KEY_FILE`` a line (relative files from its folder; ``#`` comments)."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise JobError(Location(path), f"the site list cannot be read ({exc.strerror or exc})",
                       "give the sites.csv `autocnnp federation certs` wrote, or your own") from None
    sites = {}
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, _, key_file = (part.strip() for part in line.partition(","))
        key_path = path.parent / key_file
        try:
            key = _read_key(key_path, private=False)
        except (OSError, ValueError) as exc:
            raise JobError(Location(path, number), f"site {name}: its public key {key_path} cannot be read ({exc})",
                           "write NAME,PUBLIC_KEY_FILE") from None
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise JobError(Location(path, number), f"site {name}: {key_path} is no elliptic-curve key",
                           "make one with `autocnnp federation certs` or `ssh-keygen -t ecdsa -b 384`")
        sites[name] = key
    if not sites:
        raise JobError(Location(path), "the site list names no site", "write one NAME,PUBLIC_KEY_FILE a line")
    return sites


def verified(sites: dict, name: str, challenge: str, signature: str) -> str | None:
    """None when ``name`` is listed and ``signature`` is its signature of ``challenge``; else why not."""
    key = sites.get(name)
    if key is None:
        return f"site {name!r} is not on the site list"
    try:
        key.verify(base64.b64decode(signature), challenge.encode(), ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        return f"site {name!r} did not prove it holds the key the site list names for it"
    return None


class SignedChallenge:
    """The grpc transport's site authentication: a site signs a fresh challenge with its private key, which
    must be the half of the public key the site list names for it."""

    def __init__(self, sites: dict):
        self.sites = sites

    def question(self) -> dict[str, str]:
        return {"challenge": secrets.token_hex(16)}

    def identify(self, cid: str, asked: dict, props) -> tuple[str, str | None]:
        """The site's name, and why it is refused (None if not)."""
        name = str(props.get("site", "?"))
        return name, verified(self.sites, name, asked["challenge"], str(props.get("signature", "")))


class FlowerNodes:
    """The deployment transport's site authentication: Flower's node authentication let only SuperNodes with a
    registered key in; a node's site is the name its key was registered under (``names()``: node id -> name)."""

    def __init__(self, names):
        self.names = names

    def question(self) -> dict[str, str]:
        return {}

    def identify(self, cid: str, asked: dict, props) -> tuple[str, str | None]:
        name = self.names().get(cid, "?")
        if props.get("site") != name:
            return name, f"its key is registered for site {name!r}, it calls itself {props.get('site')!r}"
        return name, None
