"""The link to the authority: every request a dynamic sidecar makes, and what it trusts.

One place decides what a request to the control plane is checked against
(the newest bundle known: the current credentials', the persisted one, the
configured one) and which identity it presents (the SVID in memory, since
the state directory's copy may lag behind it or be unreadable), so that
enrollment, renewal, the feed and the report all say the same.

It is also where the sidecar fails over between the authority's servers
(`authority.server` may list several instances): every request goes to the
server in use; a failure another instance may not share
(`sidecar.failures.another_server_may_answer`) moves to the next one, after
the jittered wait `sidecar.failover` sets, and the same request is tried
there, each server at most once per request. Only when every server has
failed does the request fail, and the duty that made it retries as it
always did. Each move is logged once (``authority_failover``, with the
reason of the failure that caused it) and counted. A move also ends the
other requests still waiting on the server left behind (a host that vanished
answers nothing): they follow at once instead of each waiting out its own
timeout, and the connections kept open to it (`sidecar.control`) are closed.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import trio

from meshid.errors import ConfigError
from meshid.events import EventLog
from meshid.reasons import Reason
from sidecar import failures
from sidecar.answer import ControlPlaneError, Each
from sidecar.config import Address, AuthoritySource
from sidecar.control import ClientIdentity, ControlClient, HeldIdentity
from sidecar.failover import Move, ServerChoice
from sidecar.failures import Failure, another_server_may_answer
from sidecar.state import Current
from sidecar.statedir import BUNDLE_FILE, KEY_FILE, SVID_FILE, identity_pem

FAILOVER_EVENT = "authority_failover"


class AuthorityLink:
    def __init__(
        self,
        clients: Sequence[ControlClient],
        current: Current,
        source: AuthoritySource,
        *,
        events: EventLog | None = None,
        rand: Callable[[], float] = random.random,
        choice: ServerChoice | None = None,
        on_failover: Callable[[str], None] = lambda reason: None,
    ) -> None:
        self.clients = tuple(clients)  # one per server of `authority.server`, in its order
        self._servers = tuple(Address(c.host, c.port) for c in self.clients)
        self.current = current
        self.source = source
        self.events = events
        self.rand = rand
        self.choice = choice or ServerChoice(len(self.clients))
        self.on_failover = on_failover  # counts a move, by the reason of the failure
        # The requests on their way to each server, so that a move away from it ends them.
        self._in_flight: dict[int, set[trio.CancelScope]] = {}

    def in_use(self) -> Address:
        """The server requests go to now, as /readyz and the metrics name it."""
        return self._servers[self.choice.index]

    def servers(self) -> tuple[Address, ...]:
        return self._servers

    async def ask(
        self,
        method: str,
        target: str | Callable[[], str],
        body: dict[str, Any] | None,
        *,
        as_client: bool = True,
        wait: float | None = None,
        each: Each | None = None,
    ) -> dict[str, Any]:
        """One request, failing over between the servers; `as_client=False` presents no
        certificate (enrollment); `each` takes a streamed answer's documents
        (`ControlClient.request`), and a document it refuses fails the request
        without failover; `target` may be a function, asked anew for each server
        tried (what a stream brought changes what to ask the next one).

        When every server failed, the failure raised is a transient one if
        any was (so that enrollment waits rather than ends), else the last.
        """
        tried: set[int] = set()
        failed: list[ControlPlaneError] = []
        taking = None if each is None else _Taking(each)
        while True:
            delay = self.choice.wait(trio.current_time())
            # The jittered wait after a move, for every request alike; none when every
            # server has been tried (this request fails now, its duty retries as it does).
            if delay > 0 and self.choice.index not in tried:
                await trio.sleep(delay)
            index = self.choice.index
            if index in tried:
                transient = [exc for exc in failed if not exc.permanent]
                raise transient[0] if transient else failed[-1]
            tried.add(index)
            try:
                path = target if isinstance(target, str) else target()
                reply = await self._request(index, method, path, body, as_client, wait, taking)
            except _Untaken as exc:
                raise exc.error from None
            except ControlPlaneError as exc:
                if not another_server_may_answer(exc.status, exc.reason):
                    raise
                failed.append(exc)
                move = self.choice.failed(index, trio.current_time(), self.rand())
                if move is not None:
                    self._moved(move, exc)
                continue
            self.choice.succeeded(index)
            return reply

    async def _request(
        self,
        index: int,
        method: str,
        target: str,
        body: dict[str, Any] | None,
        as_client: bool,
        wait: float | None,
        each: Each | None = None,
    ) -> dict[str, Any]:
        """One request to server `index`, abandoned if another request moves away from it.

        A host that vanished answers nothing: without this, each duty's request
        already on its way there would wait out its own full timeout after the
        first one gave up, which can outlast a short-lived SVID's margin.
        """
        with trio.CancelScope() as scope:
            in_flight = self._in_flight.setdefault(index, set())
            in_flight.add(scope)
            try:
                return await self.clients[index].request(
                    method,
                    target,
                    body,
                    bundle_pem=self.trust_pem(),
                    now=self.current.wall(),
                    trust=self.trust_name(),
                    identity=self.client_identity() if as_client else None,
                    wait=wait,
                    each=each,
                )
            finally:
                in_flight.discard(scope)
        # only `_moved` cancels the scope: the server was found unreachable meanwhile
        raise ControlPlaneError.judged(Failure(failures.TIMEOUT, str(self._servers[index])))

    def _moved(self, move: Move, exc: ControlPlaneError) -> None:
        """Said once per move, with the reason of the failure that caused it; the other
        requests still waiting on the server left behind follow at once."""
        for scope in self._in_flight.get(move.left, ()):
            scope.cancel()
        self.clients[move.left].drop()  # its kept connections would only go stale
        self.on_failover(exc.reason)
        if self.events is not None:
            self.events.emit(
                FAILOVER_EVENT,
                reason=exc.reason,
                left=str(self._servers[move.left]),
                to=str(self._servers[move.to]),
                detail=exc.message,
                retry_in_s=round(move.delay, 2),
                failures=move.failures,
            )

    def close(self) -> None:
        """Close every connection kept to any server (the sidecar is stopping)."""
        for client in self.clients:
            client.drop()

    def _path(self, name: str) -> Path:
        return self.source.state_dir / name

    def client_identity(self) -> ClientIdentity | HeldIdentity:
        """The SVID in memory: the state directory's copy may lag behind it or be unreadable."""
        svid = self.current.svid()
        if svid is None:
            return ClientIdentity(self._path(SVID_FILE), self._path(KEY_FILE))
        return HeldIdentity(identity_pem(svid.key, svid.chain))

    def trust_pem(self) -> bytes:
        """The newest bundle known: the current credentials', the persisted one, the configured."""
        svid = self.current.svid()
        if svid is not None:
            return svid.bundle.to_pem()
        for path in (self._path(BUNDLE_FILE), self.source.bundle):
            try:
                return path.read_bytes()
            except OSError:
                continue
        raise ConfigError(
            f"authority.bundle: cannot read {self.source.bundle}", reason=Reason.MISSING_FILE
        )

    def trust_name(self) -> str:
        """What `trust_pem` is, for a message saying the authority does not chain to it."""
        if self.current.svid() is not None:
            return "the trust bundle this sidecar holds (from the authority)"
        return f"authority.bundle ({self.source.bundle})"


class _Untaken(Exception):
    """A streamed document its taker refused: the answer failed, not the server."""

    def __init__(self, error: ControlPlaneError) -> None:
        super().__init__(error.message)
        self.error = error


class _Taking:
    """`each`, its refusals told apart from the server's failures: the server answered,
    and every one, sharing the state, would send the same (no failover for it)."""

    def __init__(self, each: Each) -> None:
        self.each = each

    async def __call__(self, doc: dict[str, Any]) -> None:
        try:
            await self.each(doc)
        except ControlPlaneError as exc:
            raise _Untaken(exc) from None
