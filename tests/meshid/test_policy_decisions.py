"""Allow-list decisions: default deny, one direction per rule, revocation wins."""

from __future__ import annotations

import pytest

from meshid.policy import ALLOWED, IDENTITY_REVOKED, NOT_ALLOWED, Policy
from meshid.spiffeid import SpiffeId, TrustDomain

TD = TrustDomain("example.org")
WEB, API, DB = (SpiffeId.resolve(name, TD) for name in ("web", "api", "db"))

POLICY = Policy.build([(WEB, API), (API, DB)], version=4)


@pytest.mark.parametrize(
    ("source", "target", "allowed", "reason"),
    [
        (WEB, API, True, ALLOWED),
        (API, WEB, False, NOT_ALLOWED),  # a rule has a direction
        (API, DB, True, ALLOWED),
        (WEB, DB, False, NOT_ALLOWED),  # not transitive
        (WEB, WEB, False, NOT_ALLOWED),  # not even to itself
    ],
)
def test_decisions(source: SpiffeId, target: SpiffeId, allowed: bool, reason: str) -> None:
    decision = POLICY.decide(source, target)
    assert (decision.allowed, decision.reason, decision.version) == (allowed, reason, 4)
    assert "policy version 4" in decision.explanation
    assert str(source) in decision.explanation and str(target) in decision.explanation


def test_empty_policy_denies_everything() -> None:
    decision = Policy.build([]).decide(WEB, API)
    assert not decision.allowed
    assert "default deny" in decision.explanation


@pytest.mark.parametrize("revoked", [WEB, API])
def test_revocation_overrides_an_allow_rule(revoked: SpiffeId) -> None:
    policy = Policy.build([(WEB, API)], version=1, revoked=[revoked], revocation_version=1)
    decision = policy.decide(WEB, API)
    assert not decision.allowed
    assert decision.reason == IDENTITY_REVOKED
    assert str(revoked) in decision.explanation
