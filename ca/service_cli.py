"""`meshid service …`: the address map for transparent interception, from the command line."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ca.cliopts import open_authority, state_or_server_option
from ca.services import build_map
from meshid.cli import Group
from meshid.errors import PolicyError
from meshid.netaddr import parse_ip_port
from meshid.reasons import Reason


@click.group("service", cls=Group)
def service_group() -> None:
    """Which identity serves which IP:PORT (for captured connections)."""


@service_group.command("add")
@click.argument("identity", metavar="ID")
@click.argument("address", metavar="ADDR:PORT")
@state_or_server_option
def add_cmd(identity: str, address: str, state: Path) -> None:
    """Map ADDR:PORT to ID (an address mapped to two identities is a conflict, not an overwrite)."""
    authority = open_authority(state)
    sid = authority.resolve(identity)
    host, port = parse_ip_port(address)
    try:
        version = authority.add_service(sid, host, port)
    except PolicyError as exc:
        if exc.reason != Reason.ALREADY_MAPPED:
            raise
        click.echo(f"{exc.message}; nothing changed")
        return
    click.echo(f"mapped {address} -> {sid} (policy version {version})")
    _, conflicts = build_map(authority.services())
    if (host, port) in conflicts:
        names = ", ".join(str(s) for s in conflicts[(host, port)])
        click.echo(
            f"warning: {address} is claimed by {names}: a conflict, left out of the map",
            err=True,
        )


@service_group.command("remove")
@click.argument("identity", metavar="ID")
@click.argument("address", metavar="ADDR:PORT")
@state_or_server_option
def remove_cmd(identity: str, address: str, state: Path) -> None:
    """Remove the mapping of ADDR:PORT to ID that `service add` made."""
    authority = open_authority(state)
    sid = authority.resolve(identity)
    host, port = parse_ip_port(address)
    version = authority.remove_service(sid, host, port)
    click.echo(f"removed {address} -> {sid} (policy version {version})")


@service_group.command("list")
@state_or_server_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
def list_cmd(state: Path, as_json: bool) -> None:
    """The address map: each address, its identity and where it came from; conflicts marked."""
    entries = open_authority(state).services()
    _, conflicts = build_map(entries)
    if as_json:
        doc = {
            "services": [
                {
                    "address": e.address,
                    "spiffe_id": str(e.spiffe_id),
                    "origin": e.origin,
                    "conflict": (e.host, e.port) in conflicts,
                }
                for e in entries
            ],
            "conflicts": [
                {
                    "address": f"{h}:{p}" if ":" not in h else f"[{h}]:{p}",
                    "claimed_by": [str(s) for s in ids],
                }
                for (h, p), ids in sorted(conflicts.items())
            ],
        }
        click.echo(json.dumps(doc, indent=2))
        return
    if not entries:
        click.echo("no services mapped")
        return
    for e in entries:
        mark = "  CONFLICT" if (e.host, e.port) in conflicts else ""
        click.echo(f"{e.address}  {e.spiffe_id}  ({e.origin}){mark}")
