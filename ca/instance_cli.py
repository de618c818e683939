"""`meshid ca join`: another instance of a trust domain whose state is in PostgreSQL."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import click

from ca.cliopts import (
    DURATION,
    database_from_options,
    database_options,
    join_authority,
    local_only,
    open_authority,
    passphrase_option,
    state_option,
    state_or_server_option,
)
from meshid.cli import Group
from meshid.errors import InvalidInput, StateError


@click.command("join")
@state_option
@local_only("ca", "join")
@database_options
@click.option(
    "--audit-key",
    "audit_key",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="A copy of another instance's audit.key: every instance extends one audit chain.",
)
@click.option(
    "--propagation",
    type=DURATION,
    help="Wait at least this long before the new root signs [default: as 'ca rotate'].",
)
@passphrase_option
def join_cmd(
    state: Path,
    database_url: str | None,
    database_password_file: Path | None,
    instance: str | None,
    audit_key: Path,
    propagation: timedelta | None,
    passphrase_file: Path | None,
) -> None:
    """Add an instance in STATE to the trust domain in --database.

    The instance's own root joins the bundle now and signs once every live
    sidecar holds it, as a rotated root does; its key never leaves STATE.
    """
    database = database_from_options(database_url, database_password_file, instance)
    if database is None:
        raise InvalidInput("--database is required: join adds an instance to a shared database")
    joined = join_authority(state, database, audit_key, propagation, passphrase_file)
    pending = joined.pending_root()
    if pending is None:  # pragma: no cover - join publishes one
        raise StateError("the new instance's root is not in the database")
    click.echo(
        f"instance {database.instance} joined {joined.trust_domain.id}: its root "
        f"{pending.generation} is in the bundle and signs from "
        f"{pending.activate_at:%Y-%m-%dT%H:%M:%SZ} once live sidecars hold it"
    )


@click.group("instance", cls=Group)
def instance_group() -> None:
    """The instances of a trust domain kept in PostgreSQL (listed by 'meshid ca status')."""


@instance_group.command("remove")
@state_or_server_option
@click.argument("name")
@click.option(
    "--now",
    "at_once",
    is_flag=True,
    help="Drop its roots from the bundle at once (its key may be in other hands): "
    "SVIDs they signed stop verifying.",
)
def remove_cmd(state: Path, name: str, at_once: bool) -> None:
    """Take the lost instance NAME out of the trust domain; its roots sign no more."""
    generations = open_authority(state).remove_instance(name, at_once=at_once)
    roots = ", ".join(str(g) for g in generations) or "none"
    if at_once:
        click.echo(f"instance {name} removed: root {roots} left the bundle")
    else:
        click.echo(
            f"instance {name} removed: root {roots} signs no more and leaves the bundle "
            "once the SVIDs it signed have expired"
        )
