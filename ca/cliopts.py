"""What every authority command shares: the --state and --passphrase-file options,
durations on the command line, and opening the authority for one command.

Passphrases come from a file or the MESHID_CA_PASSPHRASE environment variable,
never from argv, where every user of the machine could read them.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import socket
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar, cast

import click

from ca import backend
from ca.authority import Authority
from ca.backend import Database
from ca.values import check_ip
from meshid.cli import ACTING_OPERATOR
from meshid.clock import system_clock
from meshid.duration import parse_duration
from meshid.errors import InvalidInput, MeshIdError, StateError

PASSPHRASE_ENV = "MESHID_CA_PASSPHRASE"  # noqa: S105 - a variable name
F = TypeVar("F", bound=Callable[..., Any])


class DurationType(click.ParamType[timedelta, Any]):
    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, timedelta):
            return value
        try:
            return parse_duration(value)
        except MeshIdError as exc:
            self.fail(exc.message, param, ctx)


DURATION = DurationType()


def state_option(func: F) -> F:
    return click.option(
        "--state",
        "state",
        required=True,
        envvar="MESHID_CA_STATE",
        type=click.Path(path_type=Path, file_okay=False),
        help="The authority's state directory [env MESHID_CA_STATE].",
    )(func)


def state_or_server_option(func: F) -> F:
    """--state DIR, or --server HOST:PORT --svid DIR (see `ca.remote`).

    The command itself takes `state: Path` and only ever runs locally: given
    --server, the wrapper sends the command line to the control plane
    instead, prints the answer and exits with its status.
    """
    from ca.remote import remote_options, remote_or_none, run_remotely

    @functools.wraps(func)
    def either(
        *args: Any, state: Path | None, server: str | None, svid: Path | None, **kwargs: Any
    ) -> Any:
        remote = remote_or_none(state, server, svid)
        if remote is not None:
            run_remotely(remote, click.get_current_context())
        return func(*args, state=state, **kwargs)

    wrapped = remote_options(either)
    return cast(
        F,
        click.option(
            "--state",
            "state",
            envvar="MESHID_CA_STATE",
            type=click.Path(path_type=Path, file_okay=False),
            help="The authority's state directory [env MESHID_CA_STATE]; or --server/--svid.",
        )(wrapped),
    )


def local_only(*words: str) -> Callable[[F], F]:
    """For a command that acts on the authority's host itself (`ca.remotetable.LOCAL_ONLY`):
    --server and --svid are accepted only to be refused with the reason, in one line,
    before any other option is judged (a missing --state would otherwise speak first)."""
    from ca.remote import refuse_server

    def refuse(ctx: click.Context, param: click.Parameter, value: object) -> None:
        if value is not None:
            refuse_server(words)

    def decorate(func: F) -> F:
        for name in ("--svid", "--server"):
            func = click.option(
                name, hidden=True, expose_value=False, is_eager=True, callback=refuse
            )(func)
        return func

    return decorate


def passphrase_option(func: F) -> F:
    return click.option(
        "--passphrase-file",
        type=click.Path(path_type=Path, dir_okay=False),
        help=f"File holding the root key's passphrase (or set {PASSPHRASE_ENV}).",
    )(func)


def read_passphrase(path: Path | None) -> bytes | None:
    if path is not None:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise StateError(f"cannot read passphrase file {path}: {exc.strerror}") from None
        secret = data.rstrip(b"\r\n")
        if not secret:
            raise InvalidInput(f"passphrase file {path} is empty")
        return secret
    env = os.environ.get(PASSPHRASE_ENV)
    return env.encode() if env else None


def database_options(func: F) -> F:
    """--database URL, --database-password-file FILE and --instance NAME (see ca.backend)."""
    func = click.option(
        "--instance",
        help="This instance's name in the trust domain (default: the host name).",
    )(func)
    func = click.option(
        "--database-password-file",
        type=click.Path(path_type=Path, dir_okay=False),
        help="File holding the database password (or libpq's PGPASSWORD / PGPASSFILE).",
    )(func)
    return click.option(
        "--database",
        "database_url",
        metavar="URL",
        help="PostgreSQL: a libpq connection string or postgresql:// URI, without a password.",
    )(func)


def database_from_options(
    url: str | None, password_file: Path | None, instance: str | None
) -> Database | None:
    """The database named on the command line, checked; None for the embedded SQLite."""
    if url is None:
        if password_file is not None or instance is not None:
            raise InvalidInput("--database-password-file and --instance go with --database")
        return None
    name = instance if instance is not None else socket.gethostname().split(".")[0].lower()
    database = Database(
        url=backend.check_url(url),
        instance=backend.check_instance(name),
        password_file=password_file.absolute() if password_file is not None else None,
    )
    database.password()  # a missing or empty password file is refused before anything is made
    return database


def _closed_with_command(authority: Authority) -> Authority:
    """Close the database when the command ends, not whenever the GC gets to it.

    When the control plane runs the command for an operator (`ca.adminrun`),
    every audit row it writes names that operator.
    """
    ctx = click.get_current_context()
    ctx.call_on_close(authority.close)
    operator = ctx.meta.get(ACTING_OPERATOR)
    if isinstance(operator, str):
        _attribute_audit(authority, operator)
    return authority


def _attribute_audit(authority: Authority, operator: str) -> None:
    plain = authority.store.audit

    def audit(conn: Any, at: float, action: str, **details: Any) -> None:
        plain(conn, at, action, **{"operator": operator, **details})

    authority.store.audit = audit  # type: ignore[method-assign]


def open_authority(state: Path, passphrase_file: Path | None = None) -> Authority:
    return _closed_with_command(
        Authority.open(state, passphrase=read_passphrase(passphrase_file), clock=system_clock())
    )


def join_authority(
    state: Path,
    database: Database,
    audit_key: Path,
    propagation: timedelta | None,
    passphrase_file: Path | None,
) -> Authority:
    return _closed_with_command(
        Authority.join(
            state,
            database,
            audit_key=audit_key,
            propagation=propagation,
            passphrase=read_passphrase(passphrase_file),
            clock=system_clock(),
        )
    )


def _ips(values: tuple[str, ...]) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    return [check_ip(v) for v in values]
