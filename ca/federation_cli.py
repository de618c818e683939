"""`meshid federation …`: which other trust domains this one trusts, and their bundles."""

from __future__ import annotations

import json
from pathlib import Path

import click
import trio

from ca.authority import Authority
from ca.cliopts import open_authority, state_or_server_option
from ca.federation import FederatedDomain
from ca.federation_fetch import fetch_bundle, parse_endpoint_url
from meshid.bundle import TrustBundle
from meshid.cli import Group
from meshid.errors import InvalidInput, MeshIdError
from meshid.spiffeid import SpiffeId, TrustDomain

MAX_BUNDLE_FILE = 1 << 20


@click.group("federation", cls=Group)
def federation_group() -> None:
    """Trust other trust domains (SPIFFE federation), each only for its own IDs."""


def read_bundle_file(path: Path, trust_domain: TrustDomain) -> TrustBundle:
    """A bootstrap bundle: a SPIFFE bundle (JSON) or PEM roots; one-line errors."""
    try:
        with path.open("rb") as f:
            data = f.read(MAX_BUNDLE_FILE + 1)
    except OSError as exc:
        raise InvalidInput(f"--bundle {path}: {exc.strerror}") from None
    if len(data) > MAX_BUNDLE_FILE:
        raise InvalidInput(f"--bundle {path}: over {MAX_BUNDLE_FILE} bytes")
    try:
        if data.lstrip().startswith(b"{"):
            return TrustBundle.from_spiffe_json(trust_domain, data)
        return TrustBundle.from_pem(trust_domain, data, what=f"--bundle {path}")
    except MeshIdError as exc:
        raise InvalidInput(f"--bundle {path}: {exc.message}", reason=exc.reason) from None


def _line(f: FederatedDomain, authority: Authority) -> str:
    now = authority.clock_now()
    state = "stale" if f.stale(now) else "fresh"
    error = f"  last_error={f.last_error} failures={f.failures}" if f.last_error else ""
    return (
        f"{f.trust_domain}  {f.url}  {f.endpoint_id}  sequence={f.bundle.sequence}  "
        f"roots={len(f.bundle.roots)}  {state}{error}"
    )


@federation_group.command("add")
@state_or_server_option
@click.argument("trust_domain")
@click.option("--url", required=True, help="The trust domain's SPIFFE bundle endpoint (https).")
@click.option("--endpoint-id", required=True, help="The SPIFFE ID that endpoint authenticates as.")
@click.option(
    "--bundle",
    "bundle_file",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Its bootstrap bundle (SPIFFE JSON or PEM), obtained out of band.",
)
def add_cmd(state: Path, trust_domain: str, url: str, endpoint_id: str, bundle_file: Path) -> None:
    """Trust TRUST_DOMAIN: its bundle from FILE, then as its endpoint at URL serves it."""
    td = TrustDomain.parse(trust_domain)
    eid = SpiffeId.parse(endpoint_id)
    parse_endpoint_url(url)
    authority = open_authority(state)
    authority.check_federable(td, eid)
    bootstrap = read_bundle_file(bundle_file, td)
    fetched = trio.run(fetch_bundle, url, eid, bootstrap)  # nothing is stored if this fails
    added = authority.add_federation(url, eid, bootstrap, fetched)
    click.echo(f"federated with {td}: bundle sequence {added.bundle.sequence} from {url}")


@federation_group.command("list")
@state_or_server_option
@click.option("--json", "as_json", is_flag=True, help="One JSON array.")
def list_cmd(state: Path, as_json: bool) -> None:
    """The federated trust domains, their endpoints and the state of their bundles."""
    authority = open_authority(state)
    found = authority.federations()
    if as_json:
        now = authority.clock_now()
        click.echo(json.dumps([f.to_json(now) for f in found], indent=2))
        return
    for f in found:
        click.echo(_line(f, authority))


@federation_group.command("remove")
@state_or_server_option
@click.argument("trust_domain")
def remove_cmd(state: Path, trust_domain: str) -> None:
    """Stop trusting TRUST_DOMAIN (its peers are refused from the next feed on)."""
    td = TrustDomain.parse(trust_domain)
    open_authority(state).remove_federation(td)
    click.echo(f"no longer federated with {td}")


@federation_group.command("refresh")
@state_or_server_option
@click.argument("trust_domain", required=False)
def refresh_cmd(state: Path, trust_domain: str | None) -> None:
    """Fetch the bundle of TRUST_DOMAIN (or of each federated one) now.

    A failed fetch keeps the last good bundle, and says so; exit 1 if any failed.
    """
    authority = open_authority(state)
    targets = (
        [authority.federation(TrustDomain.parse(trust_domain))]
        if trust_domain
        else authority.federations()
    )
    failed = False
    for f in targets:
        try:
            fetched: TrustBundle | MeshIdError = trio.run(
                fetch_bundle, f.url, f.endpoint_id, f.bundle
            )
        except MeshIdError as exc:
            fetched = exc
        after = authority.record_fetch(f.trust_domain, fetched)
        if isinstance(fetched, MeshIdError) or after.last_error is not None:
            failed = True
            detail = fetched.message if isinstance(fetched, MeshIdError) else after.last_error
            click.echo(
                f"{f.trust_domain}: refresh failed ({after.last_error}: {detail}); keeping "
                f"bundle sequence {after.bundle.sequence}"
            )
        else:
            click.echo(f"{f.trust_domain}: bundle sequence {after.bundle.sequence}")
    if failed:
        raise SystemExit(1)
