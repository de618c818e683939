"""`--server HOST:PORT --svid DIR`: a management command sent to the control plane.

The operator's SVID (`svid.pem`, `svid.key`, `bundle.pem` in DIR) is the
client certificate; the server is trusted through that bundle and must
present the authority's own identity. The answer is printed as it comes,
each line cleaned of control characters; a refusal is one line.
"""

from __future__ import annotations

import json
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

import click
from cryptography import x509

from ca.workers import parse_listen
from meshid.adminwire import AdminAnswer
from meshid.errors import AuthorityError, MeshIdError, StateError
from meshid.reasons import Reason
from meshid.svid import leaf_spiffe_id
from meshid.wire import AUTHORITY_PATH, ErrorBody

TIMEOUT = 30.0
MAX_ANSWER = 16 * 1024 * 1024


class RemoteRefused(AuthorityError):
    """The control plane refused the call; carries its reason."""


@dataclass(frozen=True, slots=True)
class Remote:
    host: str
    port: int
    svid: Path

    def _context(self) -> ssl.SSLContext:
        try:
            ctx = ssl.create_default_context(cafile=str(self.svid / "bundle.pem"))
            ctx.load_cert_chain(self.svid / "svid.pem", self.svid / "svid.key")
        except (OSError, ssl.SSLError) as exc:
            raise StateError(
                f"--svid {self.svid}: cannot load svid.pem, svid.key and bundle.pem ({exc})",
                reason=Reason.STATE_ERROR,
            ) from None
        ctx.check_hostname = False  # the authority's SVID names a SPIFFE ID, not this host
        return ctx

    def call(self, path: str, doc: dict[str, object]) -> AdminAnswer:
        body = json.dumps(doc).encode()
        request = (
            f"POST {path} HTTP/1.1\r\nhost: {self.host}\r\nconnection: close\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
        ).encode() + body
        try:
            with (
                socket.create_connection((self.host, self.port), timeout=TIMEOUT) as raw,
                self._context().wrap_socket(raw) as tls,
            ):
                _check_authority(tls.getpeercert(binary_form=True))
                tls.sendall(request)
                data = b""
                while len(data) <= MAX_ANSWER and (chunk := tls.recv(65536)):
                    data += chunk
        except (OSError, ssl.SSLError) as exc:
            raise StateError(
                f"--server {self.host}:{self.port}: {exc}", reason=Reason.AUTHORITY_UNREACHABLE
            ) from None
        head, _, payload = data.partition(b"\r\n\r\n")
        status_line = head.split(b"\r\n", 1)[0].split()
        status = int(status_line[1]) if len(status_line) > 1 and status_line[1].isdigit() else 0
        try:
            parsed: object = json.loads(payload)
        except (ValueError, RecursionError):
            parsed = {}
        if status != 200:
            err = ErrorBody.parse(parsed)
            raise RemoteRefused(f"refused ({status}): {err.message}", reason=err.error)
        return AdminAnswer.parse(parsed)


def _check_authority(der: bytes | None) -> None:
    """The server must hold the authority's own SVID (`/meshid/authority`), not a workload's."""
    try:
        sid = leaf_spiffe_id(x509.load_der_x509_certificate(der or b""))
    except (MeshIdError, ValueError):
        sid = None
    if sid is None or sid.path != AUTHORITY_PATH:
        raise StateError(
            f"the server presented {sid or 'no SPIFFE ID'}, not the authority's identity",
            reason=Reason.UNKNOWN_CERTIFICATE,
        )


def remote_options(func: click.decorators.FC) -> click.decorators.FC:
    """--server and --svid, the alternative to --state."""
    func = click.option(
        "--svid",
        type=click.Path(path_type=Path, file_okay=False),
        help="With --server: the operator's svid.pem, svid.key and bundle.pem.",
    )(func)
    return click.option(
        "--server",
        metavar="HOST:PORT",
        help="Act through this control plane (instead of --state), as the operator of --svid.",
    )(func)


def remote_or_none(state: Path | None, server: str | None, svid: Path | None) -> Remote | None:
    """The remote, or None for --state; exactly one of the two ways is needed."""
    if server is None and svid is None:
        if state is None:
            raise click.UsageError("give --state DIR, or --server HOST:PORT --svid DIR")
        return None
    source = click.get_current_context().get_parameter_source("state")
    if state is not None and source == click.core.ParameterSource.COMMANDLINE:
        raise click.UsageError("give either --state or --server/--svid, not both")
    if server is None or svid is None:
        raise click.UsageError("--server and --svid go together")
    host, port = parse_listen(server, "--server")
    return Remote(host, port, svid)


def echo_answer(answer: AdminAnswer) -> None:
    from ca.values import printable

    for line in answer.lines:
        click.echo(printable(line))
