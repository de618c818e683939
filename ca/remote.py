"""`--server HOST:PORT --svid DIR`: an authority command run through the control plane.

Theory of operation: a command that takes `--state` (see `ca.remotetable`)
is wrapped by `state_or_server_option`. Given `--server` instead, the
command's own body never runs here: its words and its arguments, as typed
(less `--server` and `--svid`), go to ``POST /v1/admin/run`` with the files
the table names sent by value; the authority runs the very same command
line against its own state directory for the operator and answers with what
it printed and its exit status, which are printed and returned here byte
for byte. So `--json`, errors and exit codes are those of a local run.

The operator's SVID (`svid.pem`, `svid.key`, `bundle.pem` in DIR) is the
client certificate; the server is trusted through that bundle and must
present the authority's own identity. A refusal is one line.
"""

from __future__ import annotations

import json
import socket
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import click
from cryptography import x509

from ca.remotetable import LOCAL_ONLY, REMOTE, names_option
from ca.workers import parse_listen
from meshid.adminwire import MAX_ARG, RunAnswer, RunCall, RunFile
from meshid.cli import RAW_ARGS
from meshid.errors import AuthorityError, InvalidInput, MeshIdError, StateError
from meshid.reasons import Reason
from meshid.svid import leaf_spiffe_id
from meshid.wire import ADMIN_RUN, AUTHORITY_PATH, ErrorBody

TIMEOUT = 90.0  # above the authority's own limit on a command (ca.adminrun.RUN_TIMEOUT)
MAX_ANSWER = 24 * 1024 * 1024  # two outputs of MAX_OUTPUT, base64, and the JSON around them
MAX_FILE = 40 * 1024  # a file sent by value, within the control plane's 64 KiB body limit


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

    def run(self, call: RunCall) -> RunAnswer:
        """Run one command on the authority; its output and exit status."""
        return RunAnswer.parse(self._post(ADMIN_RUN, call.to_json()))

    def _post(self, path: str, doc: dict[str, object]) -> object:
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
        return parsed


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


def command_words(ctx: click.Context) -> tuple[str, ...]:
    """The command's words below `meshid` (`ca token ID` is `ca token`: its hidden default)."""
    words: list[str] = []
    at: click.Context | None = ctx
    while at is not None and at.parent is not None:
        parent = at.parent.command
        if at.info_name != getattr(parent, "default_command", None):
            words.append(str(at.info_name))
        at = at.parent
    return tuple(reversed(words))


def _without_remote_options(args: tuple[str, ...]) -> tuple[str, ...]:
    kept: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg in ("--server", "--svid"):
            skip = True
        elif not (arg.startswith("--server=") or arg.startswith("--svid=")):
            kept.append(arg)
    return tuple(kept)


def build_call(ctx: click.Context) -> RunCall:
    """This command as the control plane runs it: words, arguments, files by value."""
    words = command_words(ctx)
    spec = REMOTE.get(words)
    if spec is None:  # a command wrapped without a row in the table: a bug of ours
        raise click.UsageError(f"'{' '.join(words)}' cannot act through --server")
    args = _without_remote_options(tuple(ctx.meta.get(RAW_ARGS, ())))
    files: list[RunFile] = []
    for i, arg in enumerate(args):
        for option, why in spec.refused.items():
            if names_option(arg, option):
                raise click.UsageError(f"{option} with --server: {why}")
        if arg in spec.files and i + 1 < len(args):
            files.append(RunFile(i + 1, _read_file(arg, args[i + 1])))
        elif any(names_option(arg, o) and arg != o for o in spec.files):
            raise click.UsageError(f"with --server, give {arg[:2]}… FILE as two arguments")
    if any(len(arg) > MAX_ARG for arg in args):
        raise click.UsageError(f"an argument over {MAX_ARG} characters")
    return RunCall(words, args, tuple(files))


def _read_file(option: str, name: str) -> bytes:
    try:
        with open(name, "rb") as f:
            data = f.read(MAX_FILE + 1)
    except OSError as exc:
        raise InvalidInput(f"{option} {name}: {exc.strerror}") from None
    if len(data) > MAX_FILE:
        raise InvalidInput(
            f"{option} {name}: over {MAX_FILE // 1024} KiB, the most a file sent with "
            "--server may hold; run the command on the authority's host"
        )
    return data


def run_remotely(remote: Remote, ctx: click.Context) -> NoReturn:
    """Run the current command on the authority; print what it printed and exit as it did."""
    answer = remote.run(build_call(ctx))
    sys.stdout.flush()
    sys.stdout.buffer.write(answer.stdout)
    sys.stdout.buffer.flush()
    sys.stderr.flush()
    sys.stderr.buffer.write(answer.stderr)
    sys.stderr.buffer.flush()
    sys.exit(answer.exit_code)


def refuse_server(words: tuple[str, ...]) -> NoReturn:
    """A command of `LOCAL_ONLY` given --server: a usage error that says why."""
    raise click.UsageError(
        f"'meshid {' '.join(words)}' cannot act through --server: {LOCAL_ONLY[words]}"
    )
