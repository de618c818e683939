"""Judging from remembered leaf facts: the facts are pure, time and policy apply on every use.

A sidecar remembers what each peer certificate says about itself (resumed
sessions present the same SVID over and over); these tests pin that the
remembered facts never let time or a policy change slip.
"""

from __future__ import annotations

from datetime import timedelta

from sidecar_helpers import ForeignCa, forge, utcnow

from meshid.policy import Policy
from meshid.spiffeid import SpiffeId, TrustDomain
from sidecar.peer import INBOUND, LeafFacts, Verdict, judge_facts, leaf_facts

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
