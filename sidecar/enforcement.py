"""A new allow-list in force: swapped in, and exactly the live connections it denies closed.

Only the peers a change concerns are judged again, each once
(`sidecar.rejudge`), however many connections each has; a change that
concerns more groups than one chunk is left to the re-judge duty, which
judges them a chunk at a time with a checkpoint between chunks, so the event
loop is never held for long. A mixin of `sidecar.app.Sidecar`, which owns
the objects named here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import trio

from meshid.policy import Policy
from meshid.spiffeid import SpiffeId
from sidecar.events import EventLog
from sidecar.gate import Gate
from sidecar.metrics import Metrics
from sidecar.registry import LiveConnection, Registry
from sidecar.rejudge import affected_peers, rejudge
from sidecar.state import Current


class Enforcement:
    """install_policy and the re-judge duty, over the Sidecar's own state."""

    identity: SpiffeId
    current: Current
    registry: Registry
    gate: Gate
    metrics: Metrics
    events: EventLog
    changed: Callable[[], None]
    rejudge_chunk: int  # (direction, peer) groups judged at once
    _rejudge_wanted: trio.Event | None  # set while the duty runs
    _rejudge_restarts: int

    def install_policy(self, policy: Policy) -> int:
        """Swap in a new allow-list and close exactly the live connections it denies.

        Only the peers the change concerns are judged again, each once
        (sidecar/rejudge.py), however many connections it has. Returns the
        number closed; 0 when the change is large enough to be left to the
        re-judge duty (`_rejudge`), whose `policy` line then says the number.
        """
        old, self.current.policy = self.current.policy, policy
        self.metrics.policy_updates.inc()
        peers = affected_peers(old, policy, self.identity)
        index = self.registry.peers()
        groups = len(index) if peers is None else 2 * len(peers)
        if groups > self.rejudge_chunk and self._rejudge_wanted is not None:
            self._rejudge_wanted.set()
            self.changed()
            return 0
        closed = self._close_denied(policy, index, peers)
        self.changed()
        self.events.emit(
            "policy", version=policy.version, pairs=len(policy.pairs), closed_connections=closed
        )
        return closed

    def _close_denied(
        self,
        policy: Policy,
        index: Mapping[tuple[str, SpiffeId], Mapping[int, LiveConnection]],
        peers: set[SpiffeId] | None,
    ) -> int:
        reasons = {e.id: r for e, r in rejudge(policy, self.identity, index, peers)}
        if not reasons:
            return 0
        return self.registry.close_where(
            self.gate.cutting(lambda entry: reasons.get(entry.id)), among=reasons
        )

    async def _rejudge(self) -> None:
        """The re-judge duty: every live connection under the newest policy, a chunk at a time.

        Each chunk takes the policy in force when it starts: a change that
        comes meanwhile and concerns few peers is judged at once by
        install_policy, so the chunks already done need not see it; a large
        one asks for another whole pass.
        """
        wanted = self._rejudge_wanted = trio.Event()
        if self._rejudge_restarts:
            wanted.set()  # restarted after a failure: the pass it was on is not lost
        self._rejudge_restarts += 1
        try:
            await self._rejudge_passes(wanted)
        finally:
            self._rejudge_wanted = None  # judged at once from here on

    async def _rejudge_passes(self, wanted: trio.Event) -> None:
        while True:
            await wanted.wait()
            wanted = self._rejudge_wanted = trio.Event()
            keys = list(self.registry.peers())
            closed = 0
            for start in range(0, len(keys), self.rejudge_chunk):
                index = self.registry.peers()
                chunk = {
                    k: index[k] for k in keys[start : start + self.rejudge_chunk] if k in index
                }
                closed += self._close_denied(self.current.policy, chunk, None)
                await trio.lowlevel.checkpoint()  # let the connections (and all else) run
            policy = self.current.policy
            self.changed()
            self.events.emit(
                "policy",
                version=policy.version,
                pairs=len(policy.pairs),
                closed_connections=closed,
                rejudged_groups=len(keys),
            )
