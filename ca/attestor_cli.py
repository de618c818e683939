"""`meshid ca attestor …`: which platform-issued JWTs the authority trusts for enrollment."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ca.cliopts import open_authority, state_or_server_option
from meshid.cli import Group
from meshid.errors import InvalidInput
from meshid.jwtattest import Attestor


@click.group("attestor", cls=Group)
def attestor_group() -> None:
    """Trust JWTs of a platform (Kubernetes ServiceAccount tokens, OIDC) for enrollment."""


def _claim_pairs(claims: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    pairs = []
    for item in claims:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidInput(f"--claim {item[:64]!r}: expected KEY=VALUE")
        pairs.append((key, value))
    return tuple(pairs)


@attestor_group.command("add")
@state_or_server_option
@click.argument("name")
@click.option("--issuer", required=True, help="The tokens' iss, exactly.")
@click.option(
    "--jwks",
    "jwks_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The issuer's JWK Set in a file (re-read when it changes).",
)
@click.option("--jwks-url", help="The issuer's JWK Set at an https:// URL.")
@click.option("--audience", required=True, help="The audience the tokens must be for.")
@click.option(
    "--template",
    required=True,
    help="Claims to SPIFFE ID path, e.g. ns/{kubernetes.io.namespace}/sa/"
    "{kubernetes.io.serviceaccount.name}.",
)
@click.option("--claim", "claims", multiple=True, help="KEY=VALUE a token must carry (repeatable).")
def add_cmd(
    state: Path,
    name: str,
    issuer: str,
    jwks_file: Path | None,
    jwks_url: str | None,
    audience: str,
    template: str,
    claims: tuple[str, ...],
) -> None:
    """Trust JWTs from ISSUER for enrollment, mapped to IDs by TEMPLATE."""
    attestor = Attestor(
        name=name,
        issuer=issuer,
        audience=audience,
        template=template,
        claims=_claim_pairs(claims),
        jwks_file=str(jwks_file.absolute()) if jwks_file is not None else None,
        jwks_url=jwks_url,
    )
    open_authority(state).add_attestor(attestor)
    click.echo(f"attestor {name}: tokens from {issuer} for {audience} enroll as {template}")


@attestor_group.command("list")
@state_or_server_option
@click.option("--json", "as_json", is_flag=True, help="One JSON array.")
def list_cmd(state: Path, as_json: bool) -> None:
    """The attestors: name, issuer, audience, keys, template, required claims."""
    found = open_authority(state).attestors()
    if as_json:
        docs = [
            {
                "name": a.name,
                "issuer": a.issuer,
                "audience": a.audience,
                "template": a.template,
                "claims": dict(a.claims),
                "jwks": a.jwks_file,
                "jwks_url": a.jwks_url,
            }
            for a in found
        ]
        click.echo(json.dumps(docs, indent=2))
        return
    for a in found:
        keys = a.jwks_file or a.jwks_url
        required = " ".join(f"{k}={v}" for k, v in a.claims)
        click.echo(f"{a.name}  {a.issuer}  aud={a.audience}  {a.template}  keys={keys}  {required}")


@attestor_group.command("remove")
@state_or_server_option
@click.argument("name")
def remove_cmd(state: Path, name: str) -> None:
    """Stop trusting an attestor's tokens (SVIDs already issued stay valid until they expire)."""
    open_authority(state).remove_attestor(name)
    click.echo(f"removed attestor {name}")
