"""`meshid workload …`: a Workload API client for operators and scripts.

    meshid workload fetch x509 [--socket S] [--out DIR]
    meshid workload fetch jwt --audience AUD [--audience AUD2]… [--socket S]
    meshid workload validate jwt TOKEN --audience AUD [--socket S]
    meshid workload watch [--socket S]

`--socket` defaults to SPIFFE_ENDPOINT_SOCKET. Failures are one line, exit 1.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import click
import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshid.cli import Group
from meshid.errors import MeshIdError
from meshid.files import write_atomic, write_private
from meshid.reasons import Reason
from sidecar.workload import proto
from sidecar.workload.client import WorkloadApiError, call, unary

T = TypeVar("T")

_socket = click.option(
    "--socket",
    "endpoint",
    envvar="SPIFFE_ENDPOINT_SOCKET",
    required=True,
    metavar="PATH",
    help="the Workload API socket (default: SPIFFE_ENDPOINT_SOCKET)",
)


def _certs(der: bytes) -> list[x509.Certificate]:
    """Concatenated DER certificates (the Workload API's form), split by their ASN.1 lengths."""
    certs: list[x509.Certificate] = []
    pos = 0
    while pos < len(der):
        if der[pos] != 0x30 or pos + 2 > len(der):
            raise proto.DecodeError("not a DER certificate")
        first = der[pos + 1]
        if first < 0x80:
            header, length = 2, first
        else:
            count = first & 0x7F
            if not 1 <= count <= 4 or pos + 2 + count > len(der):
                raise proto.DecodeError("bad DER length")
            header, length = 2 + count, int.from_bytes(der[pos + 2 : pos + 2 + count], "big")
        end = pos + header + length
        if end > len(der):
            raise proto.DecodeError("truncated DER certificate")
        try:
            certs.append(x509.load_der_x509_certificate(der[pos:end]))
        except ValueError:
            raise proto.DecodeError("not a DER certificate") from None
        pos = end
    return certs


def _pem(certs: list[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _describe(svid: proto.X509Svid) -> str:
    chain = _certs(svid.x509_svid)
    if not chain:
        return f"{svid.spiffe_id} (no certificate)"
    leaf = chain[0]
    expiry = leaf.not_valid_after_utc.isoformat()
    return f"{svid.spiffe_id} serial={leaf.serial_number:x} not_after={expiry}"


@click.group("workload", cls=Group)
def workload_group() -> None:
    """A client of the SPIFFE Workload API (a sidecar's [workload_api] socket)."""


@workload_group.group("fetch", cls=Group)
def fetch_group() -> None:
    """Fetch an SVID from the socket."""


@fetch_group.command("x509")
@_socket
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="write svid.pem, svid.key (0600) and bundle.pem here",
)
def fetch_x509(endpoint: str, out: Path | None) -> None:
    """Print the ID, serial and expiry of each X.509-SVID the socket serves."""

    async def run() -> list[proto.X509Svid]:
        async with call(endpoint, "FetchX509SVID") as messages:
            async for message in messages:
                return proto.decode_x509_svid_response(message)
        raise WorkloadApiError("the server sent no SVID")

    svids = _run(run)
    for svid in svids:
        click.echo(_describe(svid))
    if out is not None and svids:
        first = svids[0]
        key = serialization.load_der_private_key(first.x509_svid_key, password=None)
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "svid.pem", _pem(_certs(first.x509_svid)))
        write_private(
            out / "svid.key",
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )
        write_atomic(out / "bundle.pem", _pem(_certs(first.bundle)))


@fetch_group.command("jwt")
@_socket
@click.option("--audience", "audiences", multiple=True, required=True, help="repeatable")
def fetch_jwt(endpoint: str, audiences: tuple[str, ...]) -> None:
    """Print a JWT-SVID for these audiences."""
    request = proto.JwtSvidRequest(audiences, "").encode()
    svids = proto.decode_jwt_svid_response(_run(lambda: unary(endpoint, "FetchJWTSVID", request)))
    if not svids:
        raise WorkloadApiError("the server sent no JWT-SVID")
    click.echo(svids[0][1])


@workload_group.group("validate", cls=Group)
def validate_group() -> None:
    """Have the socket validate a token."""


@validate_group.command("jwt")
@_socket
@click.argument("token")
@click.option("--audience", required=True)
def validate_jwt(endpoint: str, token: str, audience: str) -> None:
    """Exit 0 and print the claims if TOKEN is a valid JWT-SVID for AUDIENCE; else exit 1."""
    request = proto.ValidateJwtSvidRequest(audience, token).encode()
    try:
        reply = _run(lambda: unary(endpoint, "ValidateJWTSVID", request))
    except WorkloadApiError as exc:
        if exc.status == 3:  # INVALID_ARGUMENT: the token is not valid
            raise WorkloadApiError(exc.message, reason=Reason.JWT_INVALID) from None
        raise
    spiffe_id, claims = proto.decode_validate_response(reply)
    click.echo(json.dumps({"spiffe_id": spiffe_id, "claims": claims}, sort_keys=True))


@workload_group.command("watch")
@_socket
def watch(endpoint: str) -> None:
    """Print one line per X.509 update until interrupted."""

    async def run() -> None:
        async with call(endpoint, "FetchX509SVID") as messages:
            async for message in messages:
                stamp = datetime.now(UTC).isoformat(timespec="seconds")
                for svid in proto.decode_x509_svid_response(message):
                    click.echo(f"{stamp} {_describe(svid)}")

    _run(run)


def _run(fn: Callable[[], Awaitable[T]]) -> T:
    try:
        return trio.run(fn)
    except proto.DecodeError as exc:
        raise MeshIdError(
            f"malformed response: {exc}", reason=Reason.WORKLOAD_API_CALL_FAILED
        ) from None
