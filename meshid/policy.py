"""Allow-list decisions: may FROM open a connection to TO?

Pure and total: a decision is computed from an immutable snapshot of the
allow-list and the revocation list, and always carries a reason and the
policy version it was made under, so a log line or `policy check` can say
exactly why. Default deny.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from meshid.reasons import Reason
from meshid.spiffeid import SpiffeId

ALLOWED = Reason.ALLOWED
NOT_ALLOWED = Reason.NOT_ALLOWED
IDENTITY_REVOKED = Reason.IDENTITY_REVOKED


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

    @classmethod
    def build(
        cls,
        pairs: Iterable[tuple[SpiffeId, SpiffeId]],
        version: int = 0,
        revoked: Iterable[SpiffeId] = (),
        revocation_version: int = 0,
        revoked_serials: Iterable[int] = (),
    ) -> Policy:
        return cls(
            frozenset(pairs),
            version,
            frozenset(revoked),
            revocation_version,
            frozenset(revoked_serials),
        )

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
        if (source, target) in self.pairs:
            return Decision(
                True,
                ALLOWED,
                self.version,
                f"allowed by rule {source} -> {target} (policy version {self.version})",
            )
        return Decision(
            False,
            NOT_ALLOWED,
            self.version,
            f"no rule allows {source} -> {target} (policy version {self.version}, default deny)",
        )
