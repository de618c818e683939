"""Judging from remembered leaf facts: the facts are pure, time and policy apply on every use.

A sidecar remembers what each peer certificate says about itself (resumed
sessions present the same SVID over and over); these tests pin that the
remembered facts never let time or a policy change slip.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from cryptography.hazmat.primitives import hashes
from OpenSSL import crypto
from sidecar_helpers import ForeignCa, forge, utcnow

from meshid.policy import Policy
from meshid.spiffeid import SpiffeId, TrustDomain
from sidecar.peer import (
    INBOUND,
    OUTBOUND,
    LeafFacts,
    Verdict,
    asn1_time,
    ca_time_verdict,
    decide_pair,
    judge_facts,
    leaf_facts,
)
from sidecar.tlsio import cert_digest

TD = TrustDomain.parse("example.test")
API = SpiffeId.parse("spiffe://example.test/api")
WEB = SpiffeId.parse("spiffe://example.test/web")


def _judge(facts: LeafFacts, policy: Policy, now_offset: timedelta) -> Verdict:
    return judge_facts(
        facts,
        direction=INBOUND,
        local_id=API,
        expected=None,
        policy=policy,
        now=utcnow() + now_offset,
    )


def test_the_same_facts_expire_and_lose_their_pair_like_a_fresh_parse() -> None:
    ca = ForeignCa.create(TD)
    leaf = ca.issue("web").chain[0]
    facts = leaf_facts(leaf)
    allowed = Policy.build([(WEB, API)], version=1)
    assert facts.peer == WEB and facts.serial == leaf.serial_number
    assert _judge(facts, allowed, timedelta(0)).allowed
    assert _judge(facts, allowed, timedelta(hours=2)).reason == "expired"
    assert _judge(facts, allowed, -timedelta(minutes=5)).reason == "not_yet_valid"
    assert _judge(facts, Policy.build([], version=2), timedelta(0)).reason == "not_allowed"
    # Facts taken again from the same certificate are the same facts.
    assert leaf_facts(leaf) == facts


def test_a_leaf_that_fails_the_profile_is_remembered_as_invalid() -> None:
    ca = ForeignCa.create(TD)
    now = utcnow()
    two_ids = forge(
        uris=["spiffe://example.test/web", "spiffe://example.test/db"],
        issuer=ca.root,
        issuer_key=ca.key,
        not_before=now - timedelta(minutes=1),
        not_after=now + timedelta(hours=1),
    ).chain[0]
    facts = leaf_facts(two_ids)
    verdict = _judge(facts, Policy.build([(WEB, API)], version=1), timedelta(0))
    assert facts.peer is None
    assert verdict.reason == "invalid_svid" and not verdict.allowed


def test_ca_certificates_are_judged_on_our_clock() -> None:
    """OpenSSL checks no times: a CA in the chain out of its validity is refused by us."""
    nb = asn1_time(b"20300101000000Z")
    na = asn1_time(b"20310101000000Z")
    assert nb == datetime(2030, 1, 1, tzinfo=UTC)
    assert asn1_time(b"garbage") is None
    assert asn1_time(None) is None
    inside = datetime(2030, 6, 1, tzinfo=UTC)
    assert ca_time_verdict(nb, na, inside) is None
    late = ca_time_verdict(nb, na, datetime(2031, 1, 2, tzinfo=UTC))
    early = ca_time_verdict(nb, na, datetime(2029, 12, 31, 23, 59, 30, tzinfo=UTC))
    assert late is not None and late.reason == "expired"
    assert early is not None and early.reason == "not_yet_valid"
    within_skew = datetime(2029, 12, 31, 23, 59, 30, tzinfo=UTC)
    assert ca_time_verdict(nb, na, within_skew, timedelta(seconds=60)) is None
    bad = ca_time_verdict(None, na, inside)
    assert bad is not None and bad.reason == "invalid_certificate"


def test_the_pair_order_follows_the_direction() -> None:
    """Inbound the peer connects to us, outbound we connect to the peer."""
    one_way = Policy.build([(WEB, API)], 3)
    assert decide_pair(one_way, INBOUND, API, WEB).allowed
    assert not decide_pair(one_way, OUTBOUND, API, WEB).allowed
    assert decide_pair(one_way, OUTBOUND, WEB, API).allowed
    assert not decide_pair(one_way, INBOUND, WEB, API).allowed


def test_a_revoked_serial_is_refused_while_other_svids_of_the_id_pass() -> None:
    ca = ForeignCa.create(TD)
    revoked_leaf = ca.issue("web").chain[0]
    fresh_leaf = ca.issue("web").chain[0]
    policy = Policy.build(
        [(WEB, API)], version=1, revocation_version=3, revoked_serials=[revoked_leaf.serial_number]
    )
    verdict = _judge(leaf_facts(revoked_leaf), policy, timedelta(0))
    assert (verdict.allowed, verdict.reason) == (False, "identity_revoked")
    assert f"{revoked_leaf.serial_number:x}" in verdict.detail
    assert _judge(leaf_facts(fresh_leaf), policy, timedelta(0)).allowed


def test_the_facts_cache_key_is_the_certificates_sha256() -> None:
    """Two certificates share remembered facts only if their bytes are the same."""
    ca = ForeignCa.create(TD)
    one, other = ca.issue("web").chain[0], ca.issue("web").chain[0]
    key = cert_digest(crypto.X509.from_cryptography(one))
    assert key == one.fingerprint(hashes.SHA256())
    assert key != cert_digest(crypto.X509.from_cryptography(other))
