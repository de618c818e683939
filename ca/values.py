"""The authority's values and input checks: limits, issued-SVID records, join-token
grants, the checks every action applies to names and lifetimes, and private-file helpers.
"""

from __future__ import annotations

import fcntl
import hashlib
import ipaddress
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshid.bundle import TrustBundle
from meshid.duration import format_duration
from meshid.errors import (
    InvalidInput,
)
from meshid.jwtattest import Attested
from meshid.report import StatusReport
from meshid.spiffeid import SpiffeId
from meshid.svid import (
    IpAddress,
)

MIN_SVID_TTL = timedelta(seconds=30)
DEFAULT_SVID_TTL = timedelta(hours=1)
DEFAULT_ROOT_TTL = timedelta(days=365)
DEFAULT_TOKEN_TTL = timedelta(minutes=15)
TOKEN_PREFIX = "mjt_"  # noqa: S105 - a marker, not a secret
BUNDLE_FILE = "bundle.pem"
_SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
SIGNER_RECHECK = timedelta(seconds=1)
BUNDLE_RECHECK = 0.2  # seconds of monotonic time
REPORT_FRESH = timedelta(seconds=30)  # a sidecar silent for longer is not waited for
REPORT_FORGET = timedelta(minutes=10)  # reports older than this are deleted
MAX_INSTANCES = 8  # reports kept per identity; a new instance replaces the least recent
RESERVED_PATH = "/meshid"  # the authority's own identities live under here
_DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def check_dns_name(name: str) -> str:
    labels = name.rstrip(".").split(".")
    if len(name) > 253 or not all(_DNS_LABEL.match(label) for label in labels):
        raise InvalidInput(f"{name[:80]!r}: not a DNS name", reason="invalid_dns_name")
    return name.rstrip(".").lower()


def check_ip(text: str) -> IpAddress:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise InvalidInput(f"{text[:80]!r}: not an IP address", reason="invalid_ip") from None


OPERATOR_PATH = re.compile(r"/meshid/operator/[A-Za-z0-9._-]{1,64}")


def is_operator_id(spiffe_id: SpiffeId) -> bool:
    """`/meshid/operator/NAME`: the one reserved shape a person's SVID may take."""
    return OPERATOR_PATH.fullmatch(spiffe_id.path) is not None


def check_not_reserved(spiffe_id: SpiffeId, *, operators: bool = False) -> SpiffeId:
    """Workloads may not hold the control plane's identities (`operators`: but operators may)."""
    if operators and is_operator_id(spiffe_id):
        return spiffe_id
    if spiffe_id.path == RESERVED_PATH or spiffe_id.path.startswith(RESERVED_PATH + "/"):
        raise InvalidInput(
            f"{spiffe_id}: paths under {RESERVED_PATH}/ are reserved for the authority",
            reason="reserved_id",
        )
    return spiffe_id


def check_svid_ttl(ttl: timedelta) -> timedelta:
    if ttl < MIN_SVID_TTL:
        raise InvalidInput(
            f"SVID lifetime {format_duration(ttl)} is shorter than the minimum 30s",
            reason="invalid_duration",
        )
    return ttl


@dataclass(frozen=True, slots=True)
class IssuedSvid:
    spiffe_id: SpiffeId
    chain: tuple[x509.Certificate, ...]  # leaf first; the root is in the bundle
    bundle: TrustBundle

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]


@dataclass(frozen=True, slots=True)
class Prepared:
    """A signed certificate not yet recorded: `Authority.commit` makes it count."""

    spiffe_id: SpiffeId
    generation: int
    leaf: x509.Certificate
    how: str
    token_digest: str | None = None  # an enrollment consumes this token
    caller_serial: str | None = None  # a renewal needs this SVID to be one of ours
    attested: Attested | None = None  # an enrollment by JWT consumes this token


@dataclass(frozen=True, slots=True)
class SidecarReport:
    """A sidecar's latest report, as kept: the identity is the one its certificate proved."""

    instance: str
    spiffe_id: SpiffeId
    seen: datetime
    report: StatusReport
    skew: float | None = None  # the sidecar's clock against ours, seconds (None: no reading)


def printable(text: str, limit: int = 256) -> str:
    """`text` safe for a terminal or a log line: every non-printable character escaped.

    Newlines, carriage returns, escape sequences and non-ASCII become
    backslash escapes, so a value from a workload can neither forge a line
    nor drive the terminal; long values are cut.
    """
    shown = text if len(text) <= limit else text[:limit] + "..."
    if shown.isascii() and shown.isprintable():
        return shown
    return shown.encode("unicode_escape").decode("ascii")


@dataclass(frozen=True, slots=True)
class TokenGrant:
    spiffe_id: SpiffeId
    dns_names: tuple[str, ...]
    ip_addresses: tuple[IpAddress, ...]


def _write_private(path: Path, data: bytes) -> None:
    """Create `path` with mode 0600 from the first byte on."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


_PEM_HEAD = 200  # enough for the BEGIN line and a legacy Proc-Type header


def _is_encrypted(pem: bytes) -> bool:
    """Whether a PEM private key is passphrase-protected (PKCS#8 or legacy OpenSSL)."""
    head = pem[:_PEM_HEAD]
    return b"BEGIN ENCRYPTED PRIVATE KEY" in head or b"Proc-Type: 4,ENCRYPTED" in head


@contextmanager
def _dir_lock(state_dir: Path) -> Iterator[None]:
    with open(state_dir / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def propagation_default(svid_ttl: timedelta) -> timedelta:
    """Long enough for every watcher to hear of the new root a few times over."""
    return max(timedelta(seconds=10), min(svid_ttl / 2, timedelta(minutes=5)))
