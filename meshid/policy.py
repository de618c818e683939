"""Allow-list decisions: may FROM open a connection to TO?

Pure and total: a decision is computed from an immutable snapshot of the
allow-list and the revocation list, and always carries a reason and the
policy version it was made under, so a log line or `policy check` can say
exactly why. Default deny.

Prefix rules. Besides exact pairs, a rule end may name every ID under a
path: ``spiffe://td/ns/prod/*`` (written ``ns/prod/*``) matches
``spiffe://td/ns/prod/sa/web`` but not ``spiffe://td/ns/prod`` itself nor
``spiffe://td/ns/production/x``. An exact pair wins over any prefix rule;
among prefix rules the one with the longer source wins, then the longer
target, and the decision names the rule that matched. A decision looks up
at most (depth + 1)² keys in sets, whatever the number of rules (see
bench/policy_decision.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from meshid.errors import InvalidIdentity
from meshid.reasons import Reason
from meshid.spiffeid import SpiffeId, TrustDomain

PREFIX_MARK = "/*"

ALLOWED = Reason.ALLOWED
NOT_ALLOWED = Reason.NOT_ALLOWED
IDENTITY_REVOKED = Reason.IDENTITY_REVOKED
# Decisions one policy remembers (see Policy.decide_remembered): a sidecar asks
# about its few peers over and over; past this many the memory starts afresh.
REMEMBERED_DECISIONS = 1024


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    reason: str
    version: int
    explanation: str


@dataclass(frozen=True, slots=True)
class Policy:
    pairs: frozenset[tuple[SpiffeId, SpiffeId]]
    version: int = 0
    revoked: frozenset[SpiffeId] = frozenset()
    revocation_version: int = 0
    # Single SVIDs revoked by serial (versioned with `revoked`): the identity
    # keeps its other certificates, this one is refused wherever it shows up.
    revoked_serials: frozenset[int] = frozenset()
    # Rules with a prefix on either side, as text (`rule_end`): an exact end is
    # the ID, a prefix end the ID of the path above it followed by "/*".
    prefix_rules: frozenset[tuple[str, str]] = frozenset()
    # Decisions already made under this policy (decide_remembered). Not part of its
    # value: not compared, not hashed, and not carried over by dataclasses.replace.
    _remembered: dict[tuple[SpiffeId, SpiffeId], Decision] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )

    @classmethod
    def build(
        cls,
        pairs: Iterable[tuple[SpiffeId, SpiffeId]],
        version: int = 0,
        revoked: Iterable[SpiffeId] = (),
        revocation_version: int = 0,
        revoked_serials: Iterable[int] = (),
        prefix_rules: Iterable[tuple[str, str]] = (),
    ) -> Policy:
        return cls(
            frozenset(pairs),
            version,
            frozenset(revoked),
            revocation_version,
            frozenset(revoked_serials),
            frozenset(prefix_rules),
        )

    def matching_rule(self, source: SpiffeId, target: SpiffeId) -> tuple[str, str] | None:
        """The most specific rule allowing source -> target, or None (see the module docstring)."""
        if (source, target) in self.pairs:
            return str(source), str(target)
        if not self.prefix_rules:
            return None
        targets = rule_ends(target)
        for src in rule_ends(source):
            for dst in targets:
                if (src, dst) in self.prefix_rules:
                    return src, dst
        return None

    @property
    def rule_count(self) -> int:
        return len(self.pairs) + len(self.prefix_rules)

    def serial_decision(self, peer: SpiffeId, serial: int | None) -> Decision | None:
        """A refusal if the peer's certificate was revoked by serial, else None.

        Reported as ``identity_revoked``: to the sidecar and its metrics a
        revoked certificate is a revoked credential of that identity, refused
        and cut the same way.
        """
        if serial is None or serial not in self.revoked_serials:
            return None
        return Decision(
            False,
            IDENTITY_REVOKED,
            self.version,
            f"{peer}'s SVID {serial:x} is revoked (revocation version "
            f"{self.revocation_version}, policy version {self.version})",
        )

    def decide_remembered(self, source: SpiffeId, target: SpiffeId) -> Decision:
        """`decide`, remembered per pair for the life of this (immutable) policy.

        A sidecar decides the same few pairs on every connection, and a decision
        (its explanation text above all) cost as much as a tenth of the Python
        a resumed connection costs. A new allow-list or revocation is a new
        Policy, which remembers nothing. `decide` stays a pure computation (the
        decision bench times it).
        """
        key = (source, target)
        decision = self._remembered.get(key)
        if decision is None:
            if len(self._remembered) >= REMEMBERED_DECISIONS:
                self._remembered.clear()
            decision = self._remembered[key] = self.decide(source, target)
        return decision

    def decide(self, source: SpiffeId, target: SpiffeId) -> Decision:
        for who in (source, target):
            if who in self.revoked:
                return Decision(
                    False,
                    IDENTITY_REVOKED,
                    self.version,
                    f"{who} is revoked (revocation version {self.revocation_version}, "
                    f"policy version {self.version})",
                )
        rule = self.matching_rule(source, target)
        if rule is not None:
            return Decision(
                True,
                ALLOWED,
                self.version,
                f"allowed by rule {rule[0]} -> {rule[1]} (policy version {self.version})",
            )
        return Decision(
            False,
            NOT_ALLOWED,
            self.version,
            f"no rule allows {source} -> {target} (policy version {self.version}, default deny)",
        )


def rule_ends(sid: SpiffeId) -> list[str]:
    """The rule ends that match `sid`, most specific first: itself, then each prefix above it."""
    text = str(sid)
    ends = [text]
    cut = len(text)
    floor = len(text) - len(sid.path)  # the slash that starts the path
    while True:
        cut = text.rfind("/", floor, cut)
        if cut <= floor:
            return ends
        ends.append(text[:cut] + PREFIX_MARK)


def rule_end(text: str, trust_domain: TrustDomain) -> str:
    """A rule end as typed (an ID, a bare path, or either followed by ``/*``), normalised.

    Raises InvalidIdentity, one line, naming the text. A bare ``*`` (every
    workload) is refused: the allow-list names what may talk, not everything.
    """
    if text.endswith(PREFIX_MARK):
        base = text[: -len(PREFIX_MARK)]
        if not base or base.endswith("/") or base.endswith("://" + trust_domain.name):
            raise InvalidIdentity(f"{text!r}: a prefix needs at least one path segment before /*")
        return str(SpiffeId.resolve(base, trust_domain).require_workload()) + PREFIX_MARK
    return str(SpiffeId.resolve(text, trust_domain).require_workload())


def is_prefix(end: str) -> bool:
    return end.endswith(PREFIX_MARK)
