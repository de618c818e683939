"""Re-judge bench: the cost of a policy change to a sidecar holding 20,000 live connections.

    python -m bench.rejudge [--connections 20000] [--peers 20000] [--rounds 5]

Registers `--connections` established connection records (from `--peers`
distinct peers, half inbound, half outbound) in a real `Registry`, then times
what `Sidecar.install_policy` does with them (sidecar/rejudge.py: which peers
to look at, a decision per peer, the closes) for three changes:

- one pair removed: only that peer's connections are looked at;
- a prefix rule narrowed: every peer is judged once (the worst case);
- the same prefix change judged the way it was before the index, one
  decision per connection (the baseline the ratio is against).

Prints the median time of each and the connections closed; the promise is
≤ 1 s for 20,000 connections. A change that concerns more than
`REJUDGE_CHUNK` peers is judged by the sidecar's re-judge duty a chunk at a
time, so the event loop is held for one chunk at most: the longest chunk of
the prefix change is printed too. Not a test: timings vary with the machine.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime

import trio

from meshid.policy import Policy
from meshid.spiffeid import SpiffeId, TrustDomain
from sidecar.peer import INBOUND, OUTBOUND, decide_pair
from sidecar.registry import LiveConnection, Registry
from sidecar.rejudge import REJUDGE_CHUNK, affected_peers, rejudge

TD = TrustDomain("example.org")
ME = SpiffeId(TD, "/ns/prod/sa/me")
PREFIX = "spiffe://example.org/ns/"


def _peer(i: int) -> SpiffeId:
    return SpiffeId(TD, f"/ns/n{i % 50}/sa/p{i}")


def registry(connections: int, peers: int) -> Registry:
    reg = Registry(clock=lambda: 0.0)
    wall = datetime.now(UTC)
    for i in range(connections):
        direction = INBOUND if i % 2 else OUTBOUND
        entry = reg.open(direction, ME, f"10.0.0.1:{i}", trio.CancelScope(), wall)
        entry.peer_id, entry.peer_serial, entry.established = _peer(i % peers), i, True
        reg.establish(entry)
    return reg


def _close(reg: Registry, old: Policy, new: Policy) -> int:
    """What install_policy does: the affected peers, a decision each, the closes."""
    peers = affected_peers(old, new, ME)
    return _close_these(reg, {e.id: r for e, r in rejudge(new, ME, reg.peers(), peers)})


def _close_these(reg: Registry, reasons: dict[int, str]) -> int:
    return reg.close_where(lambda e: reasons.get(e.id), among=reasons)


def _longest_chunk(reg: Registry, new: Policy) -> float:
    """What the re-judge duty holds the loop for: the longest of its chunks."""
    keys, longest = list(reg.peers()), 0.0
    for start in range(0, len(keys), REJUDGE_CHUNK):
        began = time.perf_counter()
        index = reg.peers()
        chunk = {k: index[k] for k in keys[start : start + REJUDGE_CHUNK]}
        _close_these(reg, {e.id: r for e, r in rejudge(new, ME, chunk, None)})
        longest = max(longest, time.perf_counter() - began)
    return longest


def _close_every_connection(reg: Registry, old: Policy, new: Policy) -> int:
    """The way before the index: a decision for every live connection."""

    def denied(entry: LiveConnection) -> str | None:
        assert entry.peer_id is not None
        d = decide_pair(new, entry.direction, ME, entry.peer_id)
        return None if d.allowed else d.reason

    return reg.close_where(denied)


def _time(
    how: Callable[[Registry, Policy, Policy], int],
    connections: int,
    peers: int,
    old: Policy,
    new: Policy,
    rounds: int,
) -> tuple[float, int]:
    times, closed = [], 0
    for _ in range(rounds):
        reg = registry(connections, peers)  # fresh: a closed connection stays closed
        start = time.perf_counter()
        closed = how(reg, old, new)
        times.append(time.perf_counter() - start)
    return statistics.median(times), closed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=20_000)
    parser.add_argument("--peers", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    n, peers = args.connections, min(args.peers, args.connections)
    everyone = [(_peer(i), ME) for i in range(peers)] + [(ME, _peer(i)) for i in range(peers)]
    full = Policy.build(everyone, 1)
    one_less = Policy.build([p for p in everyone if _peer(7) not in p], 2)
    wide = Policy.build([], 1, prefix_rules=[(PREFIX + "*", str(ME)), (str(ME), PREFIX + "*")])
    narrow = Policy.build(
        [], 2, prefix_rules=[(PREFIX + "n1/*", str(ME)), (str(ME), PREFIX + "n1/*")]
    )
    cases = [
        ("one pair removed", _close, full, one_less),
        ("prefix rule narrowed", _close, wide, narrow),
        ("prefix rule narrowed, per connection (before)", _close_every_connection, wide, narrow),
    ]
    print(f"{n:,} live connections from {peers:,} peers")
    results = {}
    for name, how, old, new in cases:
        seconds, closed = _time(how, n, peers, old, new, args.rounds)
        results[name] = seconds
        verdict = "ok" if seconds <= 1.0 else "OVER 1 s"
        print(f"{name}: {seconds * 1000:.1f} ms, {closed:,} closed ({verdict})")
    chunk = statistics.median(
        _longest_chunk(registry(n, peers), narrow) for _ in range(args.rounds)
    )
    print(f"prefix rule narrowed, longest chunk of {REJUDGE_CHUNK} peers: {chunk * 1000:.1f} ms")
    ratio = results["prefix rule narrowed"] / results[cases[2][0]]
    print(f"worst case against the per-connection baseline: ratio {ratio:.2f}")


if __name__ == "__main__":
    main()
