"""Re-judging live connections after a policy change: exactly the newly denied ones, cheaply.

Pure: connection records as the registry holds them, no sockets. The registry
indexes established connections by (direction, peer); a change judges each
affected peer once, not each connection, and leaves the others untouched.
The same over a few hundred real connections is in test_sidecar_policy.py.
"""

from __future__ import annotations

from datetime import UTC, datetime

import trio

from meshid.policy import Policy
from meshid.spiffeid import SpiffeId, TrustDomain
from sidecar.peer import INBOUND, OUTBOUND
from sidecar.registry import LiveConnection, Registry
from sidecar.rejudge import affected_peers, rejudge

TD = TrustDomain("example.org")
ME = SpiffeId(TD, "/me")
WALL = datetime(2030, 1, 1, tzinfo=UTC)


def _peer(i: int) -> SpiffeId:
    return SpiffeId(TD, f"/ns/n{i % 7}/sa/p{i}")


def _registry(count: int, peers: int) -> Registry:
    """`count` established connections from `peers` distinct peers, both directions."""
    registry = Registry(clock=lambda: 0.0)
    for i in range(count):
        direction = INBOUND if i % 2 else OUTBOUND
        entry = registry.open(direction, ME, f"127.0.0.1:{i}", trio.CancelScope(), WALL)
        entry.peer_id, entry.peer_serial = _peer(i % peers), i
        registry.establish(entry)
    return registry


def _allowing(peers: int, *, version: int = 1, but: frozenset[int] = frozenset()) -> Policy:
    pairs = []
    for i in range(peers):
        if i not in but:
            pairs += [(ME, _peer(i)), (_peer(i), ME)]
    return Policy.build(pairs, version)


def _cut(registry: Registry, old: Policy, new: Policy) -> dict[LiveConnection, str]:
    return dict(rejudge(new, ME, registry.peers(), affected_peers(old, new, ME)))


def test_twenty_thousand_connections_lose_exactly_the_denied_peers() -> None:
    registry = _registry(20_000, 5_000)
    old = _allowing(5_000)
    gone = frozenset(range(0, 5_000, 97))
    new = _allowing(5_000, version=2, but=gone)
    cut = _cut(registry, old, new)
    denied = {_peer(i) for i in gone}
    expected = {e for e in registry.live() if e.peer_id in denied}
    assert set(cut) == expected and len(expected) == 4 * len(gone)
    assert set(cut.values()) == {"policy_revoked"}


def test_only_the_peers_a_change_names_are_judged() -> None:
    old = _allowing(100)
    new = _allowing(100, version=2, but=frozenset({5}))
    assert affected_peers(old, new, ME) == {_peer(5)}
    # A change elsewhere in the mesh touches none of ours.
    other = SpiffeId(TD, "/other")
    elsewhere = Policy.build([*old.pairs, (other, _peer(1))], 3)
    assert affected_peers(old, elsewhere, ME) == set()
    assert _cut(_registry(400, 100), old, elsewhere) == {}


def test_a_revocation_cuts_that_peer_and_revoking_us_cuts_everything() -> None:
    registry = _registry(300, 100)
    old = _allowing(100)
    revoked = Policy.build(old.pairs, 2, {_peer(3)}, 1)
    assert affected_peers(old, revoked, ME) == {_peer(3)}
    cut = _cut(registry, old, revoked)
    assert {e.peer_id for e in cut} == {_peer(3)}
    assert set(cut.values()) == {"identity_revoked"}
    us = Policy.build(old.pairs, 2, {ME}, 1)
    assert affected_peers(old, us, ME) is None
    assert len(_cut(registry, old, us)) == 300


def test_a_prefix_rule_change_judges_every_peer_once() -> None:
    registry = _registry(300, 100)
    prefixed = Policy.build([], 1, prefix_rules=[("spiffe://example.org/ns/*", str(ME))])
    narrower = Policy.build([], 2, prefix_rules=[("spiffe://example.org/ns/n1/*", str(ME))])
    assert affected_peers(prefixed, narrower, ME) is None
    cut = _cut(registry, prefixed, narrower)
    # Inbound from ns/n1 stays; every outbound goes (the rule allows only peer -> us).
    for entry in registry.live():
        kept = entry.direction == INBOUND and str(entry.peer_id).startswith(
            "spiffe://example.org/ns/n1/"
        )
        assert (entry not in cut) == kept


def test_a_serial_revoked_cuts_exactly_that_certificates_connections() -> None:
    registry = _registry(300, 100)
    old = _allowing(100)
    new = Policy.build(old.pairs, 2, (), 1, revoked_serials={7, 8})
    cut = _cut(registry, old, new)
    assert sorted(e.peer_serial or 0 for e in cut) == [7, 8]
    assert set(cut.values()) == {"identity_revoked"}


def test_a_closed_connection_leaves_the_index() -> None:
    registry = _registry(10, 2)
    entry = registry.live()[0]
    registry.remove(entry)
    assert entry not in {e for group in registry.peers().values() for e in group.values()}
    assert sum(len(group) for group in registry.peers().values()) == 9
