"""Enrollment by platform identity: an attestor's rules, and the decision on one JWT.

Pure: a token, the attestor, the issuer's keys and the time in; a SPIFFE ID
(or `AttestationRejected` with its reason) out. The state and the key
fetching are the authority's (`ca.attestors`).

An attestor trusts one issuer (`iss`) for one audience: a Kubernetes
cluster's projected ServiceAccount tokens, or any OIDC issuer's JWTs. The
verification, in order: the token parses, `alg` is RS256 or ES256 (never
`none`, never HMAC, so a public key cannot be used as a shared secret), its
`kid` names a key of the issuer, the signature verifies (PyJWT, through
`meshid.jwtsvid`), `iss` is the attestor's, the attestor's audience is in
`aud`, `exp` is present and not past, `nbf`/`iat` not in the future (with
`LEEWAY`), every required claim has its value, and the template renders to a
SPIFFE ID path from claims that are plain path segments.

Claim names in templates are dotted paths into the claims; a key may itself
hold dots (`kubernetes.io`), so the longest key that matches is taken first:
`{kubernetes.io.serviceaccount.name}` reads `claims["kubernetes.io"]
["serviceaccount"]["name"]`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from meshid.errors import InvalidInput, MeshIdError, TokenRejected
from meshid.jwtsvid import (
    LEEWAY,
    PublicKey,
    check_times,
    read_unverified,
    verify_signature,
)
from meshid.reasons import Reason
from meshid.spiffeid import SpiffeId, TrustDomain

ALGORITHMS = frozenset({"RS256", "ES256"})
MAX_NAME_LENGTH = 64
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*\Z")
_PLACEHOLDER = re.compile(r"\{([A-Za-z0-9_.:-]+)\}")
_SEGMENT = re.compile(r"[A-Za-z0-9._-]+\Z")
POD_UID_CLAIM = "kubernetes.io.pod.uid"


class AttestationRejected(TokenRejected):
    """An enrollment JWT the authority will not trade for an SVID."""

    reason = Reason.TOKEN_REJECTED


@dataclass(frozen=True, slots=True)
class Attestor:
    """What an operator trusts: JWTs from `issuer` for `audience`, mapped by `template`."""

    name: str
    issuer: str
    audience: str
    template: str
    claims: tuple[tuple[str, str], ...] = ()
    jwks_file: str | None = None
    jwks_url: str | None = None

    def __post_init__(self) -> None:
        if not _NAME.match(self.name) or len(self.name) > MAX_NAME_LENGTH:
            raise InvalidInput(
                f"attestor name {self.name[:64]!r}: lowercase letters, digits, '-' and '_'"
            )
        if not self.issuer or not self.audience:
            raise InvalidInput(f"attestor {self.name}: --issuer and --audience are required")
        if (self.jwks_file is None) == (self.jwks_url is None):
            raise InvalidInput(f"attestor {self.name}: give exactly one of --jwks, --jwks-url")
        if self.jwks_url is not None and not self.jwks_url.startswith("https://"):
            raise InvalidInput(f"attestor {self.name}: --jwks-url must be an https:// URL")
        for key, _ in self.claims:
            if not _PLACEHOLDER.fullmatch("{" + key + "}"):
                raise InvalidInput(f"attestor {self.name}: --claim {key[:64]!r}: bad claim name")


def check_template(template: str, trust_domain: TrustDomain) -> SpiffeId:
    """The ID the template gives when every claim is `x`; InvalidInput if none could be valid."""
    rest = _PLACEHOLDER.sub("", template)
    if "{" in rest or "}" in rest:
        raise InvalidInput(f"template {template[:128]!r}: braces only around a claim name")
    if not _PLACEHOLDER.search(template):
        raise InvalidInput(
            f"template {template[:128]!r}: names no claim, so every token would get one ID"
        )
    sample = _PLACEHOLDER.sub("x", template)
    try:
        return SpiffeId.parse(f"spiffe://{trust_domain.name}/{sample}").require_workload()
    except MeshIdError as exc:
        raise InvalidInput(f"template {template[:128]!r}: {exc.message}") from None


def claim(claims: Mapping[str, Any], name: str) -> object:
    """The claim at a dotted path (longest key first), or None."""
    parts = name.split(".")
    node: object = claims
    while parts:
        if not isinstance(node, Mapping):
            return None
        for i in range(len(parts), 0, -1):
            key = ".".join(parts[:i])
            if key in node:
                node, parts = node[key], parts[i:]
                break
        else:
            return None
    return node


def render(template: str, claims: Mapping[str, Any], trust_domain: TrustDomain) -> SpiffeId:
    """The SPIFFE ID a token's claims map to; each claim must be one plain path segment."""

    def value(match: re.Match[str]) -> str:
        found = claim(claims, match.group(1))
        if not isinstance(found, str) or not _SEGMENT.match(found) or found in (".", ".."):
            raise AttestationRejected(
                f"claim {match.group(1)!r} is missing or not a plain path segment",
                reason=Reason.JWT_CLAIM,
            )
        return found

    path = _PLACEHOLDER.sub(value, template)
    try:
        return SpiffeId.parse(f"spiffe://{trust_domain.name}/{path}").require_workload()
    except MeshIdError as exc:
        raise AttestationRejected(
            f"the template gives no valid SPIFFE ID: {exc.message}", reason=Reason.JWT_CLAIM
        ) from None


@dataclass(frozen=True, slots=True)
class Attested:
    """A verified token: the identity it maps to and what makes it single-use."""

    spiffe_id: SpiffeId
    attestor: str
    digest: str  # sha256 of the token: the replay key
    expires_at: float
    subject: str
    pod_uid: str | None


def unverified_issuer(token: str) -> tuple[str, str, str]:
    """(alg, kid, iss) of a token, to choose the attestor and key: nothing is trusted yet."""
    try:
        alg, kid, unverified = read_unverified(token, ALGORITHMS)
    except MeshIdError as exc:
        raise AttestationRejected(exc.message, reason=exc.reason) from None
    iss = unverified.get("iss")
    if not isinstance(iss, str) or not iss:
        raise AttestationRejected("token has no iss claim", reason=Reason.JWT_ISSUER)
    return alg, kid, iss


def verify(
    token: str,
    attestor: Attestor,
    keys: Mapping[str, PublicKey],
    trust_domain: TrustDomain,
    now: datetime,
    leeway: timedelta = LEEWAY,
) -> Attested:
    """The identity a valid token maps to under `attestor`, or AttestationRejected."""
    alg, kid, iss = unverified_issuer(token)
    key = keys.get(kid)
    if key is None:
        raise AttestationRejected(
            f"unknown kid {kid[:64]!r} for issuer {iss[:128]!r}", reason=Reason.JWT_UNKNOWN_KEY
        )
    try:
        verified = verify_signature(token, key, alg)
        check_times(verified, now, leeway, require_iat=True)
    except MeshIdError as exc:
        raise AttestationRejected(exc.message, reason=exc.reason) from None
    if verified.get("iss") != attestor.issuer:
        raise AttestationRejected(
            f"issuer {iss[:128]!r} is not attestor {attestor.name}'s", reason=Reason.JWT_ISSUER
        )
    aud = verified.get("aud")
    audiences = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
    if attestor.audience not in audiences:
        raise AttestationRejected(
            f"token is not for audience {attestor.audience[:64]!r}", reason=Reason.JWT_AUDIENCE
        )
    for name, wanted in attestor.claims:
        if claim(verified, name) != wanted:
            raise AttestationRejected(
                f"claim {name!r} is missing or is not the required value", reason=Reason.JWT_CLAIM
            )
    spiffe_id = render(attestor.template, verified, trust_domain)
    pod_uid = claim(verified, POD_UID_CLAIM)
    sub = verified.get("sub")
    return Attested(
        spiffe_id=spiffe_id,
        attestor=attestor.name,
        digest=hashlib.sha256(token.encode()).hexdigest(),
        expires_at=float(verified["exp"]),
        subject=sub[:256] if isinstance(sub, str) else "",
        pod_uid=pod_uid[:64] if isinstance(pod_uid, str) else None,
    )
