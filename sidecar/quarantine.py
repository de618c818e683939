"""Quarantine: which refusals of an inbound peer count, against what, and who is blocked.

Pure: time is passed in. A peer refused again and again is blocked for a
while, so that it stops costing handshakes and log lines. What a refusal is
counted against depends on what the peer proved:

- A peer refused after its handshake completed proved possession of the key
  for its SPIFFE ID (TLS 1.3 CertificateVerify, or a resumed session first
  issued to such a peer). A refusal for who it is (`IDENTITY_REFUSALS`) is
  counted against that ID.
- Anything else (junk bytes, a failed or timed-out handshake, a certificate
  refused inside the handshake) is counted against the source address. In
  TLS 1.3 our verify callback runs on the client's Certificate message, before
  CertificateVerify: a refusal there has proved nothing about the key, so the
  ID it claimed is never charged (or anyone holding a public certificate
  could quarantine its owner). Addresses get a much higher bar than IDs,
  because a NAT or a node puts many peers behind one address.
- `NOT_COUNTED`: our own limits and failures, and quarantine itself.

A blocked address is refused at accept; a blocked ID right after its
handshake, full or resumed.
"""

from __future__ import annotations

from dataclasses import dataclass

from meshid.ratelimit import FailureLimiter

ADDRESS = "address"
SPIFFE_ID = "spiffe_id"
QUARANTINED = "peer_quarantined"

IDENTITY_REFUSALS = frozenset({"not_allowed", "identity_revoked", "wrong_identity"})
NOT_COUNTED = frozenset(
    {
        QUARANTINED,
        "connection_limit",
        "internal_error",
        "app_unreachable",
        "upstream_unreachable",
    }
)


def charged_to(reason: str, *, proved: bool) -> str | None:
    """What a refusal with `reason` counts against: ADDRESS, SPIFFE_ID or None (not at all).

    `proved`: the peer completed its handshake, so its SPIFFE ID is its own.
    """
    if reason in NOT_COUNTED:
        return None
    if proved and reason in IDENTITY_REFUSALS:
        return SPIFFE_ID
    return ADDRESS


@dataclass(frozen=True, slots=True)
class Tipped:
    """A refusal that blocked its peer: what for, and the rule that did it."""

    kind: str
    key: str
    failures: int
    window: float
    block: float


class Quarantine:
    """Two failure limiters, one per kind of key; either may be off (threshold 0)."""

    def __init__(
        self,
        *,
        identity_failures: int,
        address_failures: int,
        window: float,
        block: float,
    ) -> None:
        self._limiters: dict[str, FailureLimiter] = {}
        for kind, failures in ((SPIFFE_ID, identity_failures), (ADDRESS, address_failures)):
            if failures > 0:
                self._limiters[kind] = FailureLimiter(
                    max_failures=failures, window=window, block=block
                )

    def blocked(self, kind: str, key: str, now: float) -> bool:
        limiter = self._limiters.get(kind)
        return limiter is not None and limiter.blocked(key, now) > 0

    def refused(
        self, reason: str, *, proved: bool, identity: str | None, address: str, now: float
    ) -> Tipped | None:
        """Count one refusal; returns what it blocked, if it tipped a peer over the limit."""
        kind = charged_to(reason, proved=proved)
        if kind == SPIFFE_ID and identity is None:
            kind = ADDRESS
        if kind is None:
            return None
        limiter = self._limiters.get(kind)
        if limiter is None:
            return None
        key = identity if kind == SPIFFE_ID and identity is not None else address
        if not limiter.failed(key, now):
            return None
        return Tipped(kind, key, limiter.max_failures, limiter.window, limiter.block)

    def active(self, now: float) -> dict[str, float]:
        """Every blocked peer (SPIFFE IDs and addresses) with the seconds it has left."""
        out: dict[str, float] = {}
        for limiter in self._limiters.values():
            out.update(limiter.active(now))
        return out
