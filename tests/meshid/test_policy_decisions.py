"""Allow-list decisions: default deny, one direction per rule, revocation wins."""

from __future__ import annotations

import pytest

from meshid.errors import InvalidIdentity
from meshid.policy import ALLOWED, IDENTITY_REVOKED, NOT_ALLOWED, Policy, rule_end
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


# -- prefix rules ------------------------------------------------------------------


def _sid(path: str) -> SpiffeId:
    return SpiffeId.resolve(path, TD)


PREFIXED = Policy.build(
    [(_sid("ns/prod/sa/web"), _sid("ns/prod/sa/api"))],
    version=9,
    prefix_rules=[
        (rule_end("ns/prod/*", TD), rule_end("db", TD)),
        (rule_end("ns/prod/sa/*", TD), rule_end("ns/shared/*", TD)),
        (rule_end("ns/prod/*", TD), rule_end("ns/shared/*", TD)),
        (rule_end("monitor", TD), rule_end("ns/*", TD)),
    ],
)


@pytest.mark.parametrize(
    ("source", "target", "rule"),
    [
        ("ns/prod/sa/web", "ns/prod/sa/api", "ns/prod/sa/web -> ns/prod/sa/api"),  # exact first
        ("ns/prod/sa/web", "db", "ns/prod/* -> db"),
        ("ns/prod/x/y/z", "db", "ns/prod/* -> db"),
        ("ns/prod/sa/web", "ns/shared/cache", "ns/prod/sa/* -> ns/shared/*"),  # longer source
        ("ns/prod/jobs/etl", "ns/shared/cache", "ns/prod/* -> ns/shared/*"),
        ("monitor", "ns/prod/sa/api", "monitor -> ns/*"),
    ],
)
def test_prefix_rules_allow_and_name_the_most_specific_rule(
    source: str, target: str, rule: str
) -> None:
    decision = PREFIXED.decide(_sid(source), _sid(target))
    assert (decision.allowed, decision.reason) == (True, ALLOWED)
    src, dst = rule.split(" -> ")
    assert f"allowed by rule {rule_end(src, TD)} -> {rule_end(dst, TD)} " in decision.explanation


@pytest.mark.parametrize(
    ("source", "target"),
    [
        ("ns/prod", "db"),  # a prefix matches below the path, not the path itself
        ("ns/production/x", "db"),  # whole segments only
        ("db", "ns/prod/sa/web"),  # a rule has a direction
        ("ns/prod/sa/api", "ns/prod/sa/web"),
        ("monitor", "ns"),
    ],
)
def test_prefix_rules_match_whole_segments_below_the_path_only(source: str, target: str) -> None:
    assert PREFIXED.decide(_sid(source), _sid(target)).reason == NOT_ALLOWED


def test_revocation_wins_over_a_prefix_rule() -> None:
    web = _sid("ns/prod/sa/web")
    revoked = Policy.build([], revoked=[web], prefix_rules=PREFIXED.prefix_rules)
    assert revoked.decide(web, _sid("db")).reason == IDENTITY_REVOKED


@pytest.mark.parametrize("text", ["*", "/*", "ns//*", "spiffe://example.org/*", "a/*/b", "x/*/*"])
def test_malformed_prefixes_are_refused(text: str) -> None:
    with pytest.raises(InvalidIdentity):
        rule_end(text, TD)


# -- remembered decisions (what a sidecar asks on every connection) ----------------


@pytest.mark.parametrize(
    ("source", "target"), [(WEB, API), (API, WEB), (API, DB), (WEB, DB), (WEB, WEB)]
)
def test_a_remembered_decision_is_the_decision(source: SpiffeId, target: SpiffeId) -> None:
    policy = Policy.build([(WEB, API), (API, DB)], version=4)
    first = policy.decide_remembered(source, target)
    assert first == policy.decide(source, target)
    assert policy.decide_remembered(source, target) is first  # asked again: not recomputed


def test_a_new_policy_remembers_nothing_of_the_old_one() -> None:
    import dataclasses

    allowing = Policy.build([(WEB, API)], version=1)
    assert allowing.decide_remembered(WEB, API).allowed
    revoked = dataclasses.replace(allowing, version=2, revoked=frozenset({WEB}))
    decision = revoked.decide_remembered(WEB, API)
    assert (decision.allowed, decision.reason, decision.version) == (False, IDENTITY_REVOKED, 2)
    denying = Policy.build([], version=3)
    assert not denying.decide_remembered(WEB, API).allowed


def test_remembering_changes_neither_equality_nor_hash() -> None:
    asked = Policy.build([(WEB, API)], version=1)
    asked.decide_remembered(WEB, API)
    fresh = Policy.build([(WEB, API)], version=1)
    assert asked == fresh
    assert hash(asked) == hash(fresh)


def test_what_a_policy_remembers_is_bounded() -> None:
    from meshid.policy import REMEMBERED_DECISIONS

    policy = Policy.build([(WEB, API)], version=1)
    peers = [SpiffeId.resolve(f"p{i}", TD) for i in range(REMEMBERED_DECISIONS + 10)]
    for peer in peers:
        assert not policy.decide_remembered(peer, API).allowed
    assert policy.decide_remembered(WEB, API).allowed
    assert len(policy._remembered) <= REMEMBERED_DECISIONS
