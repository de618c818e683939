"""The feed each sidecar gets is read once per version for the whole mesh, not once per sidecar.

A change wakes every sidecar, and each asks for its feed; reading the allow-list
again for each made the work grow with the square of the mesh.
"""

from __future__ import annotations

from pathlib import Path

from ca_helpers import TD, Clock

from ca.authority import Authority
from meshid.feedwire import Feed
from meshid.spiffeid import SpiffeId

IDS = [SpiffeId(TD, f"/team/svc-{i}") for i in range(6)]
DB = SpiffeId(TD, "/db")


def _pairs(authority: Authority, sid: SpiffeId) -> set[tuple[str, str]]:
    return {(str(a), str(b)) for a, b in Feed.parse(authority.feed(sid)).pairs}


def _mesh(authority: Authority) -> None:
    ring = [(str(IDS[i]), str(IDS[(i + 1) % len(IDS)])) for i in range(len(IDS))]
    authority.apply_policy([*ring, (f"spiffe://{TD.name}/team/*", str(DB))])


def test_each_sidecar_gets_its_own_pairs_and_the_prefix_rules_that_match_it(
    authority: Authority,
) -> None:
    _mesh(authority)
    for i, sid in enumerate(IDS):
        before, after = IDS[i - 1], IDS[(i + 1) % len(IDS)]
        assert _pairs(authority, sid) == {(str(before), str(sid)), (str(sid), str(after))}
        feed = Feed.parse(authority.feed(sid))
        assert feed.prefix_rules == ((f"spiffe://{TD.name}/team/*", str(DB)),)
    assert _pairs(authority, DB) == set()
    assert Feed.parse(authority.feed(DB)).prefix_rules == ((f"spiffe://{TD.name}/team/*", str(DB)),)
    assert Feed.parse(authority.feed(SpiffeId(TD, "/other"))).prefix_rules == ()


def test_a_change_made_elsewhere_is_in_the_next_feed(
    authority: Authority, state: Path, clock: Clock
) -> None:
    """Another process (a CLI command) changes the allow-list or revokes: every version
    it bumps is in the next feed this handle reads."""
    _mesh(authority)
    assert _pairs(authority, IDS[0]) == {(str(IDS[-1]), str(IDS[0])), (str(IDS[0]), str(IDS[1]))}
    other = Authority.open(state, clock=clock)
    try:
        other.deny(IDS[0], IDS[1])
        assert _pairs(authority, IDS[0]) == {(str(IDS[-1]), str(IDS[0]))}
        other.allow(IDS[0], DB)
        assert (str(IDS[0]), str(DB)) in _pairs(authority, IDS[0])
        other.revoke(IDS[3])
        assert Feed.parse(authority.feed(IDS[0])).revoked == (IDS[3],)
    finally:
        other.close()


def test_the_allow_list_is_read_once_per_version_for_every_sidecar(
    authority: Authority,
) -> None:
    _mesh(authority)
    statements: list[str] = []
    authority.store._conn.raw.set_trace_callback(statements.append)
    try:
        for _ in range(3):
            for sid in IDS:
                authority.feed(sid)
        reads = [s for s in statements if "FROM policy" in s]
        assert len(reads) <= 2, reads  # exact pairs and prefix rules, once
        authority.allow(IDS[0], DB)
        statements.clear()
        for sid in IDS:
            authority.feed(sid)
        assert 1 <= len([s for s in statements if "FROM policy" in s]) <= 2
    finally:
        authority.store._conn.raw.set_trace_callback(None)
