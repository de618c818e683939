"""`meshid ca svid list` and `meshid ca token list|delete`: issued credentials as objects.

SVIDs: each row is an issued certificate by serial (the handle a per-SVID
action takes), with its ID, expiry, how it was issued, and the sidecar
instance that holds it when a recent report names that serial.

Tokens: outstanding join tokens by identity, with expiry and whether used;
the token itself is never stored (only its hash) and never shown.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from ca.cliopts import open_authority, state_or_server_option
from ca.values import REPORT_FRESH, printable
from meshid.cli import Command, Group

CREATE = "create"  # the hidden subcommand behind `meshid ca token ID`
_VALUED = frozenset({"--state", "--server", "--svid", "--ttl", "--dns", "--ip"})


class TokenGroup(Group):
    """`ca token ID …` prints a token as before; `ca token list|delete …` are subcommands.

    The first positional argument decides (options may come before it, as in
    `ca token --state DIR web`); `list` and `delete` are therefore not usable
    as bare-path IDs here (write `spiffe://TD/list`).
    """

    default_command = CREATE  # what `ca token ID` runs; tools that walk the tree read this

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        index = 0
        while index < len(args):
            arg = args[index]
            if arg == "--":
                index += 1
                break
            if not arg.startswith("-"):
                break
            index += 2 if arg in _VALUED else 1
        if index < len(args) and args[index] in self.commands and args[index] != CREATE:
            args = [args[index], *args[:index], *args[index + 1 :]]
        elif index < len(args) or not any(a in ("-h", "--help") for a in args):
            args = [CREATE, *args]
        return super().parse_args(ctx, args)

    def format_usage(self, ctx: click.Context, formatter: Any) -> None:
        formatter.write_usage(
            ctx.command_path, "[--ttl DUR] [--dns NAME]… [--ip ADDR]… ID | list | delete ID…"
        )


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
@state_or_server_option
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


@click.command("list", cls=Command)
@click.option("--all", "show_all", is_flag=True, help="Include used and expired tokens.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
@state_or_server_option
def token_list_cmd(show_all: bool, as_json: bool, state: Path) -> None:
    """Outstanding join tokens: ID, expiry, used or not (never the token itself).

    With --json: {"tokens": [{"id", "created_at", "expires_at", "used",
    "used_at", "expired"}]}, oldest first.
    """
    authority = open_authority(state)
    now = authority.clock_now().timestamp()
    docs = [
        {
            "id": str(sid),
            "created_at": _iso(created),
            "expires_at": _iso(expires),
            "used": used is not None,
            "used_at": _iso(used) if used is not None else None,
            "expired": expires <= now,
        }
        for sid, created, expires, used in authority.tokens()
        if show_all or (used is None and expires > now)
    ]
    if as_json:
        click.echo(json.dumps({"tokens": docs}))
        return
    for doc in docs:
        state_text = "used" if doc["used"] else ("expired" if doc["expired"] else "unused")
        click.echo(f"{doc['id']} expires {doc['expires_at']} ({state_text})")
    click.echo(f"# {len(docs)} token(s)", err=True)


@click.command("delete", cls=Command)
@click.argument("spiffe_ids", metavar="ID...", nargs=-1, required=True)
@state_or_server_option
def token_delete_cmd(spiffe_ids: tuple[str, ...], state: Path) -> None:
    """Delete every unused join token of each ID; they can no longer enroll anything."""
    authority = open_authority(state)
    sids = [authority.resolve(text) for text in spiffe_ids]
    for sid in sids:
        count = authority.delete_tokens(sid)
        click.echo(f"deleted {count} unused token(s) of {sid}")
