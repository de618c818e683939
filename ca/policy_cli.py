"""`meshid policy …`: the allow-list of service pairs, from the command line."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import click

from ca.authority import Authority
from ca.cliopts import open_authority, state_or_server_option
from ca.policy_file import parse_policy_text, render_policy
from meshid.adminwire import PAGE
from meshid.cli import Group
from meshid.errors import InvalidInput, PolicyError
from meshid.federation import resolve_rule_end
from meshid.policy import Policy, is_prefix
from meshid.spiffeid import SpiffeId

F = TypeVar("F", bound=Callable[..., Any])


@click.group("policy", cls=Group)
def policy_group() -> None:
    """The allow-list of service pairs (default deny)."""


def _pair(authority: Authority, source: str, target: str) -> tuple[str, str]:
    """A rule as typed: each end an ID (ours, or a federated trust domain's), a bare
    path, or either followed by /* (a prefix)."""
    return _end(authority, source), _end(authority, target)


def _end(authority: Authority, text: str) -> str:
    # Ours or a federated trust domain's; any other trust domain is refused by name.
    return resolve_rule_end(text, authority.trust_domain, authority.federated_domains())


def rules_of(policy: Policy) -> set[tuple[str, str]]:
    """Every rule, exact pairs and prefix rules alike, as text."""
    return {(str(s), str(t)) for s, t in policy.pairs} | set(policy.prefix_rules)


def _with_rules(policy: Policy, rules: set[tuple[str, str]]) -> Policy:
    exact = [(s, t) for s, t in rules if not (is_prefix(s) or is_prefix(t))]
    return Policy.build(
        [(SpiffeId.parse(s), SpiffeId.parse(t)) for s, t in exact],
        policy.version,
        policy.revoked,
        policy.revocation_version,
        policy.revoked_serials,
        rules - set(exact),
    )


def _warn_unknown(authority: Authority, *ends: str) -> None:
    """A warning on stderr for each identity never enrolled or issued: most often a typo.

    Only a warning, and only once the command has done its work (a failed
    command stays one line): operators write policy before the workloads exist.
    Prefix ends are not checked: they name workloads to come.
    """
    for end in dict.fromkeys(ends):
        if is_prefix(end):
            continue
        sid = SpiffeId.parse(end)
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
@state_or_server_option
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
            f"{authority.versions()[0]}); nothing changed"
        )
    else:
        click.echo(f"allowed {src} -> {dst} (policy version {version})")
    _warn_unknown(authority, src, dst)


@policy_group.command("deny")
@click.argument("source", metavar="FROM")
@click.argument("target", metavar="TO")
@state_or_server_option
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
                f"{authority.versions()[0]}); nothing changed"
            )
        else:
            click.echo(f"denied {src} -> {dst} (policy version {version})")
    _warn_unknown(authority, src, dst)


def json_option(func: F) -> F:
    return click.option(
        "--json", "as_json", is_flag=True, help="Print one JSON document on stdout."
    )(func)


def _after(
    _ctx: click.Context, _param: click.Parameter, text: str | None
) -> tuple[str, str] | None:
    return _cursor(text)


def _cursor(text: str | None) -> tuple[str, str] | None:
    """`--after 'FROM -> TO'`: a line `list` printed, as the rule to start after."""
    if text is None:
        return None
    source, arrow, target = text.partition(" -> ")
    if not arrow or not source or not target:
        raise click.BadParameter("must be a line `policy list` printed: 'FROM -> TO'")
    return source, target


Page = Callable[[tuple[str, str] | None, int], tuple[list[tuple[str, str]], int, bool]]


def _pages(
    page: Page, after: tuple[str, str] | None, limit: int | None
) -> Iterator[tuple[list[tuple[str, str]], int, bool]]:
    """The pages of rules from after `after`, PAGE at a time, until `limit` rules or the end."""
    left = limit
    while True:
        rules, version, more = page(after, PAGE if left is None else min(PAGE, left))
        if left is not None:
            left -= len(rules)
        yield rules, version, more
        if not more or not rules or left == 0:
            return
        after = rules[-1]


@policy_group.command("list")
@state_or_server_option
@json_option
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    help="Print at most N rules; if more follow, say on stderr where to start the next page.",
)
@click.option(
    "--after",
    metavar="'FROM -> TO'",
    callback=_after,
    help="Start after this rule (a line `list` printed, such as the last of a page).",
)
def list_cmd(state: Path, as_json: bool, limit: int | None, after: tuple[str, str] | None) -> None:
    """Print the allow-list, one 'FROM -> TO' per line, sorted.

    The rules are read and printed a page at a time, so a list of 100,000
    takes no more memory than one of 1,000.

    With --json: {"version": N, "pairs": [{"from": ID, "to": ID}, …]}, sorted.
    """
    start = after
    page: Page = open_authority(state).rules_page
    count, versions, more, last = 0, set(), False, start
    if as_json:
        click.echo('{"pairs": [', nl=False)
    for rules, version, follows in _pages(page, start, limit):
        versions.add(version)
        more = follows
        for src, dst in rules:
            if as_json:
                sep = ", " if count else ""
                click.echo(sep + json.dumps({"from": src, "to": dst}), nl=False)
            else:
                click.echo(f"{src} -> {dst}")
            count += 1
        last = rules[-1] if rules else last
    version = max(versions, default=0)
    if as_json:
        click.echo(f'], "version": {version}}}')
        return
    click.echo(f"# policy version {version}, {count} pair(s)", err=True)
    if len(versions) > 1:
        click.echo(
            f"# the allow-list changed while it was listed (versions {min(versions)} to "
            f"{version}): list it again for one version",
            err=True,
        )
    if more and last is not None:
        click.echo(f"# more: --after '{last[0]} -> {last[1]}'", err=True)


@policy_group.command("check")
@click.argument("source", metavar="FROM")
@click.argument("target", metavar="TO")
@state_or_server_option
@json_option
def check_cmd(source: str, target: str, state: Path, as_json: bool) -> None:
    """Exit 0 if FROM may reach TO, 1 if not, with a one-line explanation.

    With --json: {"from", "to", "allowed", "reason", "version", "explanation"};
    the exit status is the same.
    """
    authority = open_authority(state)
    src, dst = authority.resolve(source), authority.resolve(target)
    decision = authority.check(src, dst)
    if as_json:
        doc = {
            "from": str(src),
            "to": str(dst),
            "allowed": decision.allowed,
            "reason": decision.reason,
            "version": decision.version,
            "explanation": decision.explanation,
        }
        click.echo(json.dumps(doc))
        sys.exit(0 if decision.allowed else 1)
    click.echo(f"{'allowed' if decision.allowed else 'denied'}: {decision.explanation}")
    sys.exit(0 if decision.allowed else 1)


@policy_group.command("apply")
@click.option(
    "-f",
    "--file",
    "path",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="The allow-list as a policy file ([[allow]] from = ... to = ...).",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Change nothing; print the diff and the live connections it would cut.",
)
@state_or_server_option
def apply_cmd(path: Path, dry_run: bool, state: Path) -> None:
    """Make the allow-list equal to FILE, printing '+ FROM -> TO' and '- FROM -> TO'.

    Applying a file that matches the list changes nothing: no new policy
    version and no audit row, so `export` then `apply` is a no-op.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        detail = exc.strerror if isinstance(exc, OSError) else "not UTF-8"
        raise InvalidInput(f"cannot read {path}: {detail}") from None
    authority = open_authority(state)
    desired = parse_policy_text(text, lambda end: _end(authority, end), name=str(path))
    if dry_run:
        policy = authority.policy()
        added = sorted(desired - rules_of(policy))
        removed = sorted(rules_of(policy) - desired)
        version = policy.version
    else:
        added, removed, version = authority.apply_policy(desired)
    for src, dst in added:
        click.echo(f"+ {src} -> {dst}")
    for src, dst in removed:
        click.echo(f"- {src} -> {dst}")
    if not added and not removed:
        click.echo(
            f"the allow-list already matches {path} (policy version {version}); nothing changed"
        )
    elif dry_run:
        policy = authority.policy()
        lines, cut = _cuts(authority, policy, _with_rules(policy, desired))
        click.echo(
            f"dry run (policy version {version}): applying would cut {cut} live connection(s) "
            "reported by sidecars; nothing was changed"
        )
        for line in lines:
            click.echo(f"  {line}")
    else:
        click.echo(
            f"applied {path}: {len(added)} added, {len(removed)} removed (policy version {version})"
        )
    _warn_unknown(authority, *(sid for pair in added for sid in pair))


def _cuts(authority: Authority, old: Policy, new: Policy) -> tuple[list[str], int]:
    """The live connections sidecars report that `old` allows and `new` would not.

    Every pair a fresh report names is judged under both policies, so a
    removed prefix rule counts the concrete pairs it alone allowed.
    """
    from ca.status import connections_of_pair

    reports, skipped = authority.reports()
    for note in skipped:
        click.echo(f"note: {note}", err=True)
    now = authority.clock_now()
    seen: set[tuple[SpiffeId, SpiffeId]] = set()
    for entry in reports:
        for pair in entry.report.pairs:
            if pair.direction == "outbound":
                seen.add((entry.spiffe_id, pair.peer_id))
            else:
                seen.add((pair.peer_id, entry.spiffe_id))
    lines: list[str] = []
    cut = 0
    for src, dst in sorted(seen):
        if old.decide(src, dst).allowed and not new.decide(src, dst).allowed:
            pair_lines, total = connections_of_pair(reports, src, dst, now)
            lines += pair_lines
            cut += total
    return lines, cut


@policy_group.command("export")
@state_or_server_option
def export_cmd(state: Path) -> None:
    """Print the allow-list as a policy file, ready for `policy apply -f`."""
    policy = open_authority(state).policy()
    click.echo(render_policy(rules_of(policy), policy.version), nl=False)


def _deny_dry_run(authority: Authority, src: str, dst: str) -> None:
    policy = authority.policy()
    rules = rules_of(policy)
    if (src, dst) not in rules:
        click.echo(
            f"dry run: {src} -> {dst} was not allowed (policy version {policy.version}); "
            "denying it would change nothing"
        )
        return
    lines, total = _cuts(authority, policy, _with_rules(policy, rules - {(src, dst)}))
    click.echo(
        f"dry run: denying {src} -> {dst} (policy version {policy.version}) would cut "
        f"{total} live connection(s) reported by sidecars; nothing was changed"
    )
    for line in lines:
        click.echo(f"  {line}")
