"""Judging a peer: is this certificate a valid SVID, and may this pair talk?

Pure. OpenSSL has already done path validation against the bundle by the
time we are asked; it hands us its verdict as an X509_V_ERR code, which we
turn into a stable reason. Then the SPIFFE profile of the leaf, the time
(resumed sessions skip OpenSSL's checks, so validity is re-checked here on
every connection), the expected upstream identity, and the allow-list.
"""

from __future__ import annotations

import functools
from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509

from meshid.errors import InvalidSvid
from meshid.federation import Bundles
from meshid.policy import Decision, Policy
from meshid.reasons import Reason
from meshid.spiffeid import SpiffeId, TrustDomain
from meshid.svid import check_leaf_profile, uri_sans

INBOUND = "inbound"
OUTBOUND = "outbound"

# OpenSSL X509_V_ERR_* codes we name.
X509_OK = 0
X509_UNABLE_TO_GET_ISSUER_CERT = 2
X509_CERT_SIGNATURE_FAILURE = 7
X509_CERT_NOT_YET_VALID = 9
X509_CERT_HAS_EXPIRED = 10
X509_DEPTH_ZERO_SELF_SIGNED_CERT = 18
X509_SELF_SIGNED_CERT_IN_CHAIN = 19
X509_UNABLE_TO_GET_ISSUER_CERT_LOCALLY = 20
X509_UNABLE_TO_VERIFY_LEAF_SIGNATURE = 21
X509_INVALID_CA = 24
X509_INVALID_PURPOSE = 26

_UNTRUSTED = frozenset(
    {
        X509_UNABLE_TO_GET_ISSUER_CERT,
        X509_CERT_SIGNATURE_FAILURE,
        X509_DEPTH_ZERO_SELF_SIGNED_CERT,
        X509_SELF_SIGNED_CERT_IN_CHAIN,
        X509_UNABLE_TO_GET_ISSUER_CERT_LOCALLY,
        X509_UNABLE_TO_VERIFY_LEAF_SIGNATURE,
    }
)


def decide_pair(policy: Policy, direction: str, local_id: SpiffeId, peer: SpiffeId) -> Decision:
    """The allow-list decision for one connection: the one place its order is written.

    Inbound, the peer opens a connection to us (peer -> local); outbound, we
    open one to the peer (local -> peer).
    """
    if direction == INBOUND:
        return policy.decide_remembered(peer, local_id)
    return policy.decide_remembered(local_id, peer)


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    reason: str
    detail: str
    peer_id: SpiffeId | None = None
    serial: int | None = None
    not_after: datetime | None = None


def _claimed_id(leaf: x509.Certificate) -> SpiffeId | None:
    """The ID a certificate claims, for messages only: it is not yet trusted."""
    try:
        uris = uri_sans(leaf)
        return SpiffeId.parse(uris[0]) if len(uris) == 1 else None
    except Exception:  # a hostile certificate may break any parser; we only want a label
        return None


def chain_error_verdict(
    leaf: x509.Certificate | None, code: int, trusted: TrustDomain | Collection[TrustDomain]
) -> Verdict:
    """Name what OpenSSL's path validation found wrong."""
    claimed = _claimed_id(leaf) if leaf is not None else None
    who = str(claimed) if claimed else "peer certificate"
    domains = {trusted} if isinstance(trusted, TrustDomain) else set(trusted)
    if code == X509_CERT_HAS_EXPIRED:
        return Verdict(False, Reason.EXPIRED, f"{who} has expired", claimed)
    if code == X509_CERT_NOT_YET_VALID:
        return Verdict(False, Reason.NOT_YET_VALID, f"{who} is not valid yet", claimed)
    if code in _UNTRUSTED:
        if claimed is not None and claimed.trust_domain not in domains:
            return Verdict(
                False,
                Reason.UNTRUSTED_TRUST_DOMAIN,
                f"{who} is from trust domain {claimed.trust_domain}, which we do not trust",
                claimed,
            )
        return Verdict(
            False,
            Reason.UNTRUSTED_CERTIFICATE,
            f"{who} does not chain to the bundle of its trust domain",
            claimed,
        )
    if code in (X509_INVALID_PURPOSE, X509_INVALID_CA):
        return Verdict(
            False, Reason.INVALID_SVID, f"{who}: not usable for mTLS (code {code})", claimed
        )
    return Verdict(
        False, Reason.INVALID_CERTIFICATE, f"{who}: certificate rejected (code {code})", claimed
    )


@functools.lru_cache(maxsize=256)  # CA certificates: a handful, seen on every handshake
def asn1_time(raw: bytes | None) -> datetime | None:
    """OpenSSL's `YYYYMMDDhhmmssZ` as an aware datetime; None when absent or malformed."""
    if raw is None:
        return None
    try:
        return datetime.strptime(raw.decode("ascii"), "%Y%m%d%H%M%SZ").replace(tzinfo=UTC)
    except (UnicodeDecodeError, ValueError):
        return None


def ca_time_verdict(
    not_before: datetime | None,
    not_after: datetime | None,
    now: datetime,
    skew: timedelta = timedelta(0),
) -> Verdict | None:
    """A CA certificate in a peer's chain judged on our clock (OpenSSL's check is off)."""
    if not_before is None or not_after is None:
        return Verdict(
            False, Reason.INVALID_CERTIFICATE, "a CA certificate has unreadable validity"
        )
    if now > not_after:
        return Verdict(False, Reason.EXPIRED, "a CA certificate in the peer's chain has expired")
    if now + skew < not_before:
        return Verdict(
            False, Reason.NOT_YET_VALID, "a CA certificate in the peer's chain is not valid yet"
        )
    return None


@dataclass(frozen=True, slots=True)
class LeafFacts:
    """What judging needs from a leaf that cannot change: a pure function of its bytes.

    Time, the expected identity and the allow-list are applied per connection
    by `judge_facts`; these facts can therefore be remembered per certificate
    and reused when the same SVID resumes its session again and again.
    """

    peer: SpiffeId | None  # None when the leaf fails the X509-SVID profile
    problem: str  # why it fails, when it does
    claimed: SpiffeId | None
    serial: int
    not_before: datetime
    not_after: datetime


def leaf_facts(leaf: x509.Certificate) -> LeafFacts:
    try:
        peer: SpiffeId | None = check_leaf_profile(leaf)
        problem = ""
    except InvalidSvid as exc:
        peer, problem = None, exc.message
    return LeafFacts(
        peer,
        problem,
        peer if peer is not None else _claimed_id(leaf),
        leaf.serial_number,
        leaf.not_valid_before_utc,
        leaf.not_valid_after_utc,
    )


def judge_facts(
    facts: LeafFacts,
    *,
    direction: str,
    local_id: SpiffeId,
    expected: SpiffeId | None,
    policy: Policy,
    now: datetime,
    skew: timedelta = timedelta(0),
    federated: Collection[TrustDomain] = (),
) -> Verdict:
    """The verdict on a peer whose chain OpenSSL accepted (or who resumed a session).

    `federated`: the other trust domains whose bundles we hold; whether the
    chain anchors in the right one is `anchor_verdict`'s question.
    """
    peer = facts.peer
    if peer is None:
        return Verdict(False, Reason.INVALID_SVID, facts.problem, facts.claimed)
    serial = facts.serial
    not_after = facts.not_after
    if peer.trust_domain != local_id.trust_domain and peer.trust_domain not in federated:
        return Verdict(
            False,
            Reason.UNTRUSTED_TRUST_DOMAIN,
            f"{peer} is not in trust domain {local_id.trust_domain} nor a federated one",
            peer,
            serial,
            not_after,
        )
    if now > not_after:
        return Verdict(
            False, Reason.EXPIRED, f"{peer} certificate has expired", peer, serial, not_after
        )
    if now + skew < facts.not_before:
        return Verdict(
            False,
            Reason.NOT_YET_VALID,
            f"{peer} certificate is not valid yet",
            peer,
            serial,
            not_after,
        )
    if direction == OUTBOUND and expected is not None and peer != expected:
        return Verdict(
            False,
            Reason.WRONG_IDENTITY,
            f"upstream presented {peer}, expected {expected}",
            peer,
            serial,
            not_after,
        )
    decision = policy.serial_decision(peer, serial) or decide_pair(
        policy, direction, local_id, peer
    )
    return Verdict(decision.allowed, decision.reason, decision.explanation, peer, serial, not_after)


def anchor_verdict(
    facts: LeafFacts, anchor: x509.Certificate | None, bundles: Bundles
) -> Verdict | None:
    """A refusal if the chain OpenSSL built does not anchor in the leaf's own trust domain.

    OpenSSL's store holds the roots of every trusted domain, so it accepts a
    chain that anchors in any of them; this is the check that a certificate
    naming a.example was signed by a.example's roots, not by a federated
    b.example's. None: the anchor is right (or the leaf names no valid ID,
    which judge_facts refuses).
    """
    peer = facts.peer
    if peer is None:
        return None
    bundle = bundles.get(peer.trust_domain)
    if bundle is None:
        return Verdict(
            False,
            Reason.UNTRUSTED_TRUST_DOMAIN,
            f"{peer} is from trust domain {peer.trust_domain}, which we do not trust",
            peer,
            facts.serial,
            facts.not_after,
        )
    if anchor is None or not bundle.contains(anchor):
        return Verdict(
            False,
            Reason.UNTRUSTED_CERTIFICATE,
            f"{peer} does not chain to a root of trust domain {peer.trust_domain}",
            peer,
            facts.serial,
            facts.not_after,
        )
    return None
