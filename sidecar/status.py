"""The status report a sidecar sends the control plane, built as a `meshid.report.StatusReport`.

Pure: built from what the sidecar holds now (its SVID, its allow-list, its
live connections, its quarantined peers). Always within the report's limits
(`meshid.report`), so a busy sidecar is never refused: a sample of
connections and quarantined peers with a count of the rest, and the pairs
with the most connections first.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import cast

from meshid import report as limits
from meshid.policy import Policy
from meshid.report import (
    ConnectionInfo,
    Direction,
    PairCount,
    PairRefusal,
    QuarantinedPeer,
    StatusReport,
)
from meshid.spiffeid import SpiffeId
from sidecar.credentials import Svid
from sidecar.registry import LiveConnection


def build_report(
    instance: str,
    svid: Svid | None,
    policy: Policy,
    live: Iterable[LiveConnection],
    live_count: int,
    quarantined: Mapping[str, float],
    refusals: Sequence[PairRefusal] = (),
    advertise: tuple[str, ...] = (),
) -> StatusReport:
    """What the control plane hears every few seconds (see `meshid ca status`)."""
    pairs: dict[tuple[str, str], tuple[Direction, SpiffeId, int]] = {}
    listed: list[ConnectionInfo] = []
    for entry in live:
        if entry.peer_id is None or not entry.established:
            continue
        direction = cast(Direction, entry.direction)
        key = (entry.direction, str(entry.peer_id))
        seen = pairs.get(key)
        pairs[key] = (direction, entry.peer_id, (seen[2] if seen else 0) + 1)
        if len(listed) < limits.MAX_CONNECTIONS:
            listed.append(
                ConnectionInfo(
                    id=entry.id,
                    direction=direction,
                    peer_id=entry.peer_id,
                    peer_addr=entry.peer_addr,
                    started=entry.started_wall,
                    bytes_in=entry.bytes_in,
                    bytes_out=entry.bytes_out,
                )
            )
    established = sum(count for _, _, count in pairs.values())
    busiest = sorted(pairs.items(), key=lambda item: -item[1][2])[: limits.MAX_PAIRS]
    peers = sorted(quarantined.items())
    built = StatusReport(
        instance=instance,
        svid_serial=f"{svid.serial:x}" if svid else None,
        svid_not_after=svid.not_after if svid else None,
        bundle_sequence=svid.bundle.sequence if svid else 0,
        policy_version=policy.version,
        revocation_version=policy.revocation_version,
        live_connections=live_count,
        pairs=tuple(PairCount(d, p, n) for _, (d, p, n) in sorted(busiest)),
        connections=tuple(listed),
        connections_omitted=established - len(listed),
        quarantined=tuple(
            QuarantinedPeer(peer[: limits.MAX_TEXT], round(left))
            for peer, left in peers[: limits.MAX_QUARANTINED]
        ),
        quarantined_omitted=max(0, len(peers) - limits.MAX_QUARANTINED),
        advertise=advertise,
    )
    return _with_refusals(built, refusals)


def _with_refusals(built: StatusReport, refusals: Sequence[PairRefusal]) -> StatusReport:
    """The largest counts first, as many as fit both MAX_REFUSALS and the report's byte limit.

    Refusals are the one part a sidecar may shorten to stay within the limit
    (the pair counts must be whole), so they get what room the rest leaves.
    """
    room = limits.MAX_REPORT_BYTES - len(built.encode()) - 64  # the two keys, the brackets
    kept: list[PairRefusal] = []
    for refusal in refusals[: limits.MAX_REFUSALS]:
        size = len(StatusReport("x", refusals=(refusal,)).encode()) - len(
            StatusReport("x").encode()
        )
        if size + 1 > room:
            break
        room -= size + 1
        kept.append(refusal)
    return replace(built, refusals=tuple(kept), refusals_omitted=len(refusals) - len(kept))
