"""What every authority command shares: the --state and --passphrase-file options,
durations on the command line, and opening the authority for one command.

Passphrases come from a file or the MESHID_CA_PASSPHRASE environment variable,
never from argv, where every user of the machine could read them.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import click

from ca import backend
from ca.authority import Authority
from ca.backend import Database
from ca.values import check_ip
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
    """--state DIR, or --server HOST:PORT --svid DIR (see `ca.remote`)."""
    from ca.remote import remote_options

    func = remote_options(func)
    return click.option(
        "--state",
        "state",
        envvar="MESHID_CA_STATE",
        type=click.Path(path_type=Path, file_okay=False),
        help="The authority's state directory [env MESHID_CA_STATE]; or --server/--svid.",
    )(func)


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
    """Close the database when the command ends, not whenever the GC gets to it."""
    click.get_current_context().call_on_close(authority.close)
    return authority


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
