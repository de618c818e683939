"""`meshid policy …`: the allow-list of service pairs, from the command line."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ca.authority import Authority
from ca.cliopts import open_authority, state_option
from meshid.cli import Group
from meshid.errors import PolicyError
from meshid.spiffeid import SpiffeId


@click.group("policy", cls=Group)
def policy_group() -> None:
    """The allow-list of service pairs (default deny)."""


def _pair(authority: Authority, source: str, target: str) -> tuple[SpiffeId, SpiffeId]:
    return authority.resolve_pair_id(source), authority.resolve_pair_id(target)


def _warn_unknown(authority: Authority, *ids: SpiffeId) -> None:
    """A warning on stderr for each identity never enrolled or issued: most often a typo.

    Only a warning, and only once the command has done its work (a failed
    command stays one line): operators write policy before the workloads exist.
    """
    for sid in dict.fromkeys(ids):
        if sid.trust_domain != authority.trust_domain:
            continue  # a federated domain's workloads enroll with their own authority
        if not authority.ever_known(sid):
            click.echo(
                f"warning: {sid} has never been enrolled or issued; check the spelling",
                err=True,
            )


@policy_group.command("allow")
@click.argument("source", metavar="FROM")
@click.argument("target", metavar="TO")
@state_option
def allow_cmd(source: str, target: str, state: Path) -> None:
    """Let FROM open connections to TO (a pair already allowed is left as it is).

    Allowing a pair already on the list changes nothing: the policy version
    stays (every new version wakes every sidecar) and no audit row is
    written (the audit log records changes to what is enforced).
    """
    authority = open_authority(state)
    src, dst = _pair(authority, source, target)
    try:
        version = authority.allow(src, dst)
    except PolicyError as exc:
        if exc.reason != "already_allowed":
            raise
        click.echo(
            f"{src} -> {dst} was already allowed (policy version "
            f"{authority.policy().version}); nothing changed"
        )
    else:
        click.echo(f"allowed {src} -> {dst} (policy version {version})")
    _warn_unknown(authority, src, dst)


@policy_group.command("deny")
@click.argument("source", metavar="FROM")
@click.argument("target", metavar="TO")
@state_option
@click.option(
    "--dry-run",
    is_flag=True,
    help="Change nothing; list the live connections the change would cut, as sidecars report.",
)
def deny_cmd(source: str, target: str, state: Path, dry_run: bool) -> None:
    """Remove the pair FROM -> TO from the allow-list (a pair not on it is left as it is).

    Like `allow`, denying a pair not on the list changes nothing, bumps no
    version and writes no audit row.
    """
    authority = open_authority(state)
    src, dst = _pair(authority, source, target)
    if dry_run:
        _deny_dry_run(authority, src, dst)
    else:
        try:
            version = authority.deny(src, dst)
        except PolicyError as exc:
            if exc.reason != "unknown_pair":
                raise
            click.echo(
                f"{src} -> {dst} was not allowed (policy version "
                f"{authority.policy().version}); nothing changed"
            )
        else:
            click.echo(f"denied {src} -> {dst} (policy version {version})")
    _warn_unknown(authority, src, dst)


@policy_group.command("list")
@state_option
def list_cmd(state: Path) -> None:
    """Print the allow-list, one 'FROM -> TO' per line."""
    policy = open_authority(state).policy()
    for src, dst in sorted(policy.pairs):
        click.echo(f"{src} -> {dst}")
    click.echo(f"# policy version {policy.version}, {len(policy.pairs)} pair(s)", err=True)


@policy_group.command("check")
@click.argument("source", metavar="FROM")
@click.argument("target", metavar="TO")
@state_option
def check_cmd(source: str, target: str, state: Path) -> None:
    """Exit 0 if FROM may reach TO, 1 if not, with a one-line explanation."""
    authority = open_authority(state)
    src, dst = _pair(authority, source, target)
    decision = authority.check(src, dst)
    click.echo(f"{'allowed' if decision.allowed else 'denied'}: {decision.explanation}")
    sys.exit(0 if decision.allowed else 1)


def _deny_dry_run(authority: Authority, src: SpiffeId, dst: SpiffeId) -> None:
    from ca.status import connections_of_pair

    policy = authority.policy()
    if (src, dst) not in policy.pairs:
        click.echo(
            f"dry run: {src} -> {dst} was not allowed (policy version {policy.version}); "
            "denying it would change nothing"
        )
        return
    reports, skipped = authority.reports()
    lines, total = connections_of_pair(reports, src, dst, authority.clock_now())
    for note in skipped:
        click.echo(f"note: {note}", err=True)
    click.echo(
        f"dry run: denying {src} -> {dst} (policy version {policy.version}) would cut "
        f"{total} live connection(s) reported by sidecars; nothing was changed"
    )
    for line in lines:
        click.echo(f"  {line}")
