"""`meshid ca operator add|remove|list`: who may manage the mesh through the control plane."""

from __future__ import annotations

from pathlib import Path

import click

from ca.cliopts import open_authority, state_or_server_option
from meshid.cli import Group
from meshid.spiffeid import SpiffeId


@click.group("operator", cls=Group)
def operator_group() -> None:
    """Operator identities (spiffe://TD/meshid/operator/NAME) that may call the admin API."""


@operator_group.command("add")
@state_or_server_option
@click.argument("spiffe_id", metavar="ID")
def add_cmd(state: Path, spiffe_id: str) -> None:
    """Let ID manage the mesh with --server/--svid (audited)."""
    authority = open_authority(state)
    sid = SpiffeId.resolve(spiffe_id, authority.trust_domain)
    authority.operator_add(sid)
    click.echo(f"operator {sid} added")


@operator_group.command("remove")
@state_or_server_option
@click.argument("spiffe_id", metavar="ID")
def remove_cmd(state: Path, spiffe_id: str) -> None:
    """Take ID off the operator list (audited); its SVID stays valid for workloads' sake."""
    authority = open_authority(state)
    sid = SpiffeId.resolve(spiffe_id, authority.trust_domain)
    authority.operator_remove(sid)
    click.echo(f"operator {sid} removed")


@operator_group.command("list")
@state_or_server_option
def list_cmd(state: Path) -> None:
    """Print the operator list, one ID per line."""
    for sid in open_authority(state).operators():
        click.echo(str(sid))
