"""`meshid ca …`: the authority's command line (`meshid policy …` is ca.policy_cli).

Thin: each command parses its arguments into kernel types, opens the
authority, calls one method and prints the result. Passphrases come from a
file or the MESHID_CA_PASSPHRASE environment variable, never from argv,
where every user of the machine could read them.
"""

from __future__ import annotations

import json
import sys
from datetime import timedelta
from pathlib import Path

import click

from ca import backend
from ca.attestor_cli import attestor_group
from ca.authority import Authority
from ca.cliopts import (
    DURATION,
    _closed_with_command,
    _ips,
    database_from_options,
    database_options,
    local_only,
    open_authority,
    passphrase_option,
    read_passphrase,
    state_option,
    state_or_server_option,
)
from ca.instance_cli import instance_group, join_cmd
from ca.jwtkeys import JwtKeyring, with_jwt_keys
from ca.objects_cli import CREATE, TokenGroup, svid_group, token_delete_cmd, token_list_cmd
from ca.operator_cli import operator_group
from ca.values import DEFAULT_ROOT_TTL, DEFAULT_SVID_TTL, DEFAULT_TOKEN_TTL
from meshid.cli import Group
from meshid.clock import system_clock
from meshid.duration import format_duration
from meshid.errors import StateError
from meshid.files import write_atomic
from meshid.spiffeid import TrustDomain
from meshid.svid import certs_to_pem, generate_key, key_to_pem


@click.group("ca", cls=Group)
def ca_group() -> None:
    """The certificate authority: bootstrap, issue, enroll, revoke, publish."""


@ca_group.command("init")
@state_option
@local_only("ca", "init")
@click.option("--trust-domain", required=True, help="Lowercase DNS-like name, e.g. example.org.")
@click.option(
    "--svid-ttl",
    type=DURATION,
    default=format_duration(DEFAULT_SVID_TTL),
    show_default=True,
    help="Lifetime of workload certificates (at least 30s).",
)
@click.option(
    "--root-ttl",
    type=DURATION,
    default=format_duration(DEFAULT_ROOT_TTL),
    show_default=True,
    help="Lifetime of the root certificate.",
)
@passphrase_option
@database_options
def init_cmd(
    state: Path,
    trust_domain: str,
    svid_ttl: timedelta,
    root_ttl: timedelta,
    passphrase_file: Path | None,
    database_url: str | None,
    database_password_file: Path | None,
    instance: str | None,
) -> None:
    """Create a new authority in STATE: root key and certificate, bundle, database.

    With --database, the trust domain lives in that PostgreSQL database and
    STATE holds this host's instance; more join with 'meshid ca join'.
    """
    td = TrustDomain.parse(trust_domain)
    database = database_from_options(database_url, database_password_file, instance)
    authority = _closed_with_command(
        Authority.init(
            state,
            td,
            svid_ttl=svid_ttl,
            root_ttl=root_ttl,
            passphrase=read_passphrase(passphrase_file),
            database=database,
            clock=system_clock(),
        )
    )
    root = authority.bundle().roots[0]
    where = (
        str(state) if database is None else f"the database, instance {database.instance} in {state}"
    )
    click.echo(
        f"initialised authority for {td.id} in {where}: root expires "
        f"{root.not_valid_after_utc:%Y-%m-%d}, SVID lifetime {format_duration(svid_ttl)}"
    )


@ca_group.command("issue")
@state_option
@local_only("ca", "issue")
@click.argument("spiffe_id", metavar="ID")
@click.option(
    "--out", required=True, type=click.Path(path_type=Path, file_okay=False), help="Output dir."
)
@click.option("--ttl", type=DURATION, help="Lifetime (default: the authority's SVID lifetime).")
@click.option("--dns", multiple=True, help="Extra DNS SAN (repeatable).")
@click.option("--ip", multiple=True, help="Extra IP SAN (repeatable).")
@passphrase_option
def issue_cmd(
    state: Path,
    spiffe_id: str,
    out: Path,
    ttl: timedelta | None,
    dns: tuple[str, ...],
    ip: tuple[str, ...],
    passphrase_file: Path | None,
) -> None:
    """Issue an SVID offline into OUT: svid.pem, svid.key (0600), bundle.pem."""
    authority = open_authority(state, passphrase_file)
    sid = authority.resolve(spiffe_id)
    ips = _ips(ip)
    key = generate_key()
    issued = authority.issue(
        sid, key.public_key(), ttl=ttl, dns_names=dns, ip_addresses=ips, how="issue"
    )
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "svid.key", key_to_pem(key), mode=0o600)
        write_atomic(out / "svid.pem", certs_to_pem(issued.chain))
        write_atomic(out / "bundle.pem", issued.bundle.to_pem())
    except OSError as exc:
        raise StateError(f"cannot write to {out}: {exc.strerror}") from None
    click.echo(
        f"issued {sid} serial {issued.leaf.serial_number:x} valid until "
        f"{issued.leaf.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ} into {out}"
    )
    if authority.capped_svids:
        click.echo(
            "warning: svid_capped_by_root: cut short to the root's own expiry; "
            "rotate the root ('meshid ca rotate', or run 'meshid ca serve')",
            err=True,
        )


@ca_group.group("token", cls=TokenGroup)
def token_group() -> None:
    """Join tokens: `ca token ID` prints a new one; `list` and `delete` manage them."""


@token_group.command(CREATE, hidden=True)
@state_or_server_option
@click.argument("spiffe_id", metavar="ID")
@click.option(
    "--ttl",
    type=DURATION,
    default=format_duration(DEFAULT_TOKEN_TTL),
    show_default=True,
    help="How long the token may be used.",
)
@click.option("--dns", multiple=True, help="DNS SAN the enrolled SVIDs may carry (repeatable).")
@click.option("--ip", multiple=True, help="IP SAN the enrolled SVIDs may carry (repeatable).")
def token_cmd(
    state: Path, spiffe_id: str, ttl: timedelta, dns: tuple[str, ...], ip: tuple[str, ...]
) -> None:
    """Print a one-time join token bound to ID (only the token, on stdout)."""
    authority = open_authority(state)
    sid = authority.resolve(spiffe_id)
    token = authority.create_token(sid, ttl=ttl, dns_names=dns, ip_addresses=_ips(ip))
    click.echo(token)


@ca_group.command("revoke")
@state_or_server_option
@click.argument("spiffe_id", metavar="[ID]", required=False)
@click.option("--serial", help="Revoke only the SVID with this serial (hex), not the identity.")
def revoke_cmd(state: Path, spiffe_id: str | None, serial: str | None) -> None:
    """Revoke ID (or one SVID by --serial): sidecars drop and refuse it; no renewal."""
    if (spiffe_id is None) == (serial is None):
        raise click.UsageError("give either ID or --serial SERIAL")
    authority = open_authority(state)
    if serial is not None:
        owner, version = authority.revoke_serial(serial)
        click.echo(f"revoked SVID {serial.lower()} of {owner} (revocation version {version})")
        return
    assert spiffe_id is not None
    sid = authority.resolve(spiffe_id)
    version = authority.revoke(sid)
    click.echo(f"revoked {sid} (revocation version {version})")


@ca_group.command("unrevoke")
@state_or_server_option
@click.argument("spiffe_id", metavar="ID")
def unrevoke_cmd(state: Path, spiffe_id: str) -> None:
    """Lift ID's revocation: it may renew and connect again (an ID not revoked is left as it is)."""
    authority = open_authority(state)
    sid = authority.resolve(spiffe_id)
    version = authority.unrevoke(sid)
    if version is None:
        click.echo(f"{sid} was not revoked; nothing changed")
    else:
        click.echo(f"unrevoked {sid} (revocation version {version})")


@ca_group.command("bundle")
@state_or_server_option
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["pem", "spiffe"]),
    default="pem",
    show_default=True,
    help="PEM certificates, or a SPIFFE bundle (JWK Set).",
)
def bundle_cmd(state: Path, fmt: str) -> None:
    """Print the trust bundle."""
    authority = open_authority(state)
    bundle = authority.bundle()
    if fmt == "pem":
        sys.stdout.buffer.write(bundle.to_pem())
    else:  # the SPIFFE bundle: X.509 roots and the JWT-SVID keys
        keyring = JwtKeyring(state, authority.clock_now)
        doc = with_jwt_keys(bundle.to_spiffe(), keyring, authority.shared_jwt_keys())
        click.echo(json.dumps(doc, indent=2))


@ca_group.command("serve")
@state_option
@local_only("ca", "serve")
@click.option("--listen", required=True, help="HOST:PORT to serve the control plane on (TLS).")
@click.option("--dns", multiple=True, help="DNS name clients reach the server by (repeatable).")
@click.option("--ip", multiple=True, help="IP address clients reach the server by (repeatable).")
@click.option(
    "--workers",
    type=click.IntRange(1, 64),
    default=1,
    show_default=True,
    help="Server processes sharing the port; one per core for the most signatures per second.",
)
@click.option(
    "--auto-rotate/--no-auto-rotate",
    default=True,
    show_default=True,
    help="Publish the next root at half the active root's life and let it sign from three "
    "quarters (once live sidecars hold it), so the root never expires. Turn off only if "
    "you run 'meshid ca rotate' yourself.",
)
@click.option(
    "--metrics",
    metavar="HOST:PORT",
    help="Serve Prometheus metrics over plain HTTP here (/metrics, /healthz, /version); "
    "with --workers N, worker i serves PORT+i. Off by default.",
)
@click.option(
    "--ui",
    metavar="HOST:PORT",
    help="Serve the read-only service graph page over plain HTTP here; with --workers N, "
    "worker i serves PORT+i. Off by default.",
)
@click.option(
    "--bundle-endpoint",
    metavar="HOST:PORT",
    help="Serve the trust domain's SPIFFE bundle here for federation (SPIFFE Federation, "
    "https_spiffe profile; endpoint ID spiffe://TD/meshid/authority). Off by default.",
)
@click.option(
    "--limit",
    "limits",
    multiple=True,
    metavar="NAME=N",
    help="Size an admission cap to the mesh (repeatable): max_connections, max_per_source, "
    "max_authenticated, max_watches, max_watches_per_identity, renewals_per_identity. "
    "See the README's Limits.",
)
@passphrase_option
def serve_cmd(
    state: Path,
    listen: str,
    dns: tuple[str, ...],
    ip: tuple[str, ...],
    workers: int,
    auto_rotate: bool,
    passphrase_file: Path | None,
    metrics: str | None,
    ui: str | None,
    bundle_endpoint: str | None,
    limits: tuple[str, ...],
) -> None:
    """Run the control plane: enrollment, renewal, bundle, policy and revocation feed."""
    from ca.plane import ServerOptions, parse_limits
    from ca.servelock import hold_serve_lock
    from ca.workers import default_names, parse_listen, run_server
    from meshid.events import EventLog

    host, port = parse_listen(listen)
    metrics_at = parse_listen(metrics, "--metrics") if metrics else None
    ui_at = parse_listen(ui, "--ui") if ui else None
    bundle_at = parse_listen(bundle_endpoint, "--bundle-endpoint") if bundle_endpoint else None
    names, ips = (tuple(dns), tuple(_ips(ip))) if dns or ip else default_names(host)
    caps = parse_limits(limits)
    passphrase = read_passphrase(passphrase_file)
    clock = system_clock()  # the process's one clock: every worker and the authority share it
    probe = Authority.open(state, passphrase=passphrase, clock=clock)
    try:
        # held until the process and its workers exit: one control plane per state dir
        lock = hold_serve_lock(state)
        if probe.own_root_pending() is None:  # a joining instance waits for its root instead
            probe.signer()  # fail now, with a clear message, on a missing key or wrong passphrase
    finally:
        probe.close()  # each worker opens its own connection
    events = EventLog()
    options = ServerOptions(
        host=host,
        port=port,
        dns_names=names,
        ip_addresses=ips,
        auto_rotate=auto_rotate,
        metrics=metrics_at,
        ui=ui_at,
        bundle_endpoint=bundle_at,
        **caps,
    )
    try:
        status = run_server(
            lambda: Authority.open(state, passphrase=passphrase, clock=clock),
            options,
            events.emit,
            workers,
            clock=clock,
            shared_database=backend.load(state) is not None,
        )
    finally:
        lock.release()
    sys.exit(status)


@ca_group.command("rotate")
@state_option
@local_only("ca", "rotate")
@click.option(
    "--propagation",
    type=DURATION,
    help="How long the next root is only published before it signs "
    "(default: half the SVID lifetime, between 10s and 5m).",
)
@click.option(
    "--force",
    is_flag=True,
    help="Activate after the delay even if a live sidecar has not confirmed the new bundle.",
)
@passphrase_option
def rotate_cmd(
    state: Path, propagation: timedelta | None, force: bool, passphrase_file: Path | None
) -> None:
    """Roll the root: publish the next root now, let it sign after the propagation delay.

    Activation also waits until every live sidecar reports holding the new
    bundle (unless --force); `meshid ca status` shows who it waits for.
    """
    from ca.values import propagation_default

    authority = open_authority(state, passphrase_file)
    delay = propagation if propagation is not None else propagation_default(authority.svid_ttl)
    with authority.rotation_lock():  # `ca serve` may be rotating by itself
        generation, activate_at = authority.rotate(delay, wait_for_acks=not force)
    click.echo(
        f"published root {generation}; it signs from {activate_at:%Y-%m-%dT%H:%M:%SZ} "
        f"(in {format_duration(delay)}); the old root stays in the bundle until its last "
        "SVID expires"
    )


@ca_group.group("audit")
def audit_group() -> None:
    """The authority's hash-chained audit log."""


@audit_group.command("verify")
@state_or_server_option
def audit_verify_cmd(state: Path) -> None:
    """Check the audit log's hash chain; exit 1 at the first broken entry."""
    authority = open_authority(state)
    checked, broken = authority.store.verify_audit()
    if broken is not None:
        raise StateError(f"audit log tampered: {broken}", reason="audit_broken")
    click.echo(f"audit log intact: {checked} entries")


@audit_group.command("export")
@state_or_server_option
def audit_export_cmd(state: Path) -> None:
    """Print the audit log as JSON lines (oldest first)."""
    import json
    from datetime import UTC, datetime

    for entry in open_authority(state).store.audit_entries():
        record = {
            "seq": entry.seq,
            "time": datetime.fromtimestamp(entry.at, UTC).isoformat(),
            "action": entry.action,
            "details": entry.details,
            "prev_hash": entry.prev_hash,
            "hash": entry.hash,
        }
        click.echo(json.dumps(record, separators=(",", ":")))


@ca_group.command("status")
@state_or_server_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
def status_cmd(state: Path, as_json: bool) -> None:
    """Enrolled workloads, running sidecars, SVID expiry, bundle held; warnings first."""
    from ca.status import render_status, status_document

    authority = open_authority(state)
    if as_json:
        click.echo(json.dumps(status_document(authority)))
        return
    for line in render_status(authority):
        click.echo(line)


ca_group.add_command(attestor_group)
ca_group.add_command(join_cmd)
ca_group.add_command(instance_group)
ca_group.add_command(operator_group)
ca_group.add_command(svid_group)
token_group.add_command(token_list_cmd)
token_group.add_command(token_delete_cmd)
