"""Re-judging live connections after a policy change: which peers to look at, and the verdicts.

Theory of operation. The registry indexes its established connections by
(direction, peer ID). A new policy is compared with the old one
(`affected_peers`): a change to exact pairs or to revocations names the peers
whose decision can have moved, and only their connections are looked at; a
change that can move anyone (a prefix rule, a revoked serial, this sidecar's
own revocation) looks at every peer. Either way each (direction, peer) is
decided once, whatever the number of its connections, so re-judging 20,000
connections costs a decision per distinct peer (bench/rejudge.py). Pure: the
caller closes what `rejudge` names.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

from meshid.policy import Policy
from meshid.reasons import Reason
from meshid.spiffeid import SpiffeId
from sidecar.peer import INBOUND, OUTBOUND, decide_pair
from sidecar.registry import LiveConnection

REJUDGE_CHUNK = 256  # (direction, peer) groups judged between two checkpoints


def affected_peers(old: Policy, new: Policy, local: SpiffeId) -> set[SpiffeId] | None:
    """The peers whose connections a change from `old` to `new` can deny; None: any."""
    if (
        old.prefix_rules != new.prefix_rules
        or not new.revoked_serials <= old.revoked_serials
        or local in new.revoked
    ):
        return None
    peers = {
        t if s == local else s
        for s, t in old.pairs.symmetric_difference(new.pairs)
        if local in (s, t)
    }
    peers.update(new.revoked - old.revoked)
    return peers


def rejudge(
    policy: Policy,
    local: SpiffeId,
    index: Mapping[tuple[str, SpiffeId], Mapping[int, LiveConnection]],
    peers: set[SpiffeId] | None,
) -> Iterator[tuple[LiveConnection, str]]:
    """Each live connection `policy` now denies, with the reason it is closed for.

    `peers` (from `affected_peers`) limits the look to those peers; None looks at all.
    `index` is the registry's (`Registry.peers`); closing an entry leaves it there
    until its task ends, so the index does not change under this walk.
    """
    if peers is None:
        groups: Iterable[tuple[tuple[str, SpiffeId], Mapping[int, LiveConnection]]] = list(
            index.items()
        )
    else:
        groups = [
            ((direction, peer), index[(direction, peer)])
            for peer in peers
            for direction in (INBOUND, OUTBOUND)
            if (direction, peer) in index
        ]
    serials = policy.revoked_serials
    for (direction, peer), entries in groups:
        decision = decide_pair(policy, direction, local, peer)
        if not decision.allowed:
            reason = (
                Reason.IDENTITY_REVOKED
                if decision.reason == Reason.IDENTITY_REVOKED
                else Reason.POLICY_REVOKED
            )
            for entry in list(entries.values()):
                yield entry, Reason.IDENTITY_REVOKED if entry.peer_serial in serials else reason
        elif serials:
            for entry in list(entries.values()):
                if entry.peer_serial in serials:
                    yield entry, Reason.IDENTITY_REVOKED
