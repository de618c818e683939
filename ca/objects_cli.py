"""`meshid ca svid list`: the SVIDs the authority issued, as objects an operator can name.

Each row is an issued certificate by serial (the handle a per-SVID action
takes), with its ID, expiry, how it was issued, and the sidecar instance that
holds it when a recent report names that serial.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import click

from ca.cliopts import open_authority, state_option
from ca.values import REPORT_FRESH, printable
from meshid.cli import Group


@click.group("svid", cls=Group)
def svid_group() -> None:
    """The SVIDs this authority issued."""


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


@svid_group.command("list")
@click.argument("spiffe_id", metavar="[ID]", required=False)
@click.option(
    "--expired/--no-expired", default=False, help="Include SVIDs already expired (default: no)."
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
@state_option
def svid_list_cmd(spiffe_id: str | None, expired: bool, as_json: bool, state: Path) -> None:
    """Issued SVIDs (of ID, if given): ID, serial, expiry, how issued, instance if reported.

    With --json: {"svids": [{"id", "serial", "not_after", "issued_at", "how",
    "instance"}]} (instance is null when no recent report names the serial);
    newest expiry first.
    """
    authority = open_authority(state)
    sid = authority.resolve(spiffe_id) if spiffe_id is not None else None
    now = authority.clock_now()
    holders: dict[str, str] = {}
    reports, _skipped = authority.reports()
    for entry in reports:
        serial = entry.report.svid_serial
        if serial and now - entry.seen <= REPORT_FRESH:
            holders[serial.lower()] = entry.instance
    rows = authority.issued_svids(sid, None if expired else now.timestamp())
    docs = [
        {
            "id": str(row_id),
            "serial": serial,
            "not_after": _iso(not_after),
            "issued_at": _iso(issued_at),
            "how": how,
            "instance": holders.get(serial),
        }
        for row_id, serial, not_after, issued_at, how in rows
    ]
    if as_json:
        click.echo(json.dumps({"svids": docs}))
        return
    for doc in docs:
        instance = doc["instance"]
        held = f", held by [{printable(str(instance))}]" if instance else ""
        click.echo(
            f"{doc['id']} serial {doc['serial']} expires {doc['not_after']} ({doc['how']}){held}"
        )
    click.echo(f"# {len(docs)} SVID(s)", err=True)
