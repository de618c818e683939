"""The copy loop: one task that moves every established connection's bytes.

Theory of operation. Once a connection is established, its bytes are moved
by one trio task per sidecar, the `Pump`, which owns an epoll set of its own
and waits on it with `trio.lowlevel.wait_readable`. Each ready socket runs a
few non-blocking calls of the connection's `Flow` state machine
(`sidecar.flow`), directly, with no task switch. A connection's own task just
waits for its flow to end (and cancelling it, as a policy cut does, drops the
flow). This is the design of event-driven proxies: trio's per-wait costs (a
task switch, an `epoll_ctl` to re-arm a one-shot registration) are paid once
per batch of ready sockets instead of once per message, which halves the CPU
a small request costs (see bench/RESULTS.md).

Registrations are level-triggered and change only when a direction blocks or
ends: while bytes simply flow, no `epoll_ctl` is made at all.
"""

from __future__ import annotations

import contextlib
import select
import socket

import outcome
import trio

from sidecar.flow import DONE, BufferPool, Flow, StreamAborted
from sidecar.registry import LiveConnection
from sidecar.tlsio import TlsStream

PASSES = 4  # batches of ready sockets per wakeup before other tasks get a turn


class Pump:
    """The one task that moves every established connection's bytes."""

    def __init__(self, pool: BufferPool | None = None) -> None:
        self.pool = pool or BufferPool()
        self._epoll = select.epoll()
        self._flows: dict[int, Flow] = {}
        self.running = False
        self.now = 0.0  # trio's clock when the current batch began: activity times for idle cuts

    def __len__(self) -> int:
        """Connections the pump is moving bytes for."""
        return len({id(flow) for flow in self._flows.values()})

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        epoll = self._epoll
        flows = self._flows
        self.running = True
        task_status.started()
        try:
            while True:
                await trio.lowlevel.wait_readable(epoll.fileno())
                self.now = trio.current_time()
                # Under load more sockets become ready while a batch is handled;
                # taking them now is cheaper than a trip through trio's loop.
                for _ in range(PASSES):
                    ready = epoll.poll(0)
                    if not ready:
                        break
                    for fd, events in ready:
                        flow = flows.get(fd)
                        if flow is not None:
                            self._drive(flow, fd, events)
        finally:
            self.running = False
            for flow in list(flows.values()):
                self._finish(flow, outcome.Error(StreamAborted("shutdown")))
            trio.lowlevel.notify_closing(epoll.fileno())
            epoll.close()

    async def copy(self, plain: socket.socket, tls: TlsStream, entry: LiveConnection) -> None:
        """Copy both ways until both directions have ended. Raises StreamAborted on failure."""
        if not self.running:
            raise StreamAborted("shutdown")
        flow = Flow(self, plain, tls, entry)
        self.now = trio.current_time()
        self._flows[flow.pfd] = flow
        self._flows[flow.tfd] = flow
        # OpenSSL may already hold bytes that arrived with the handshake, and the
        # app may have written first: try both directions before waiting.
        try:
            flow.step_down()
            flow.step_up()
            self._update(flow)  # a failed registration too: the flow must not stay half-listed
        except Exception as exc:  # handed to the connection's task below
            self._finish(flow, outcome.Error(exc))
        if flow.result is None:
            flow.task = trio.lowlevel.current_task()

            def abort(_: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
                self._drop(flow)
                return trio.lowlevel.Abort.SUCCEEDED

            await trio.lowlevel.wait_task_rescheduled(abort)
            return
        flow.result.unwrap()

    def _drive(self, flow: Flow, fd: int, events: int) -> None:
        try:
            flow.on_event(fd, events)
            self._update(flow)
        except Exception as exc:  # one connection's failure, raised in its own task
            self._finish(flow, outcome.Error(exc))

    def _update(self, flow: Flow) -> None:
        if flow.up_state == DONE and flow.down_state == DONE:
            self._finish(flow, outcome.Value(None))
            return
        plain, tls = flow.masks()
        if plain != flow.pmask:
            self._register(flow.pfd, flow.pmask, plain)
            flow.pmask = plain
        if tls != flow.tmask:
            self._register(flow.tfd, flow.tmask, tls)
            flow.tmask = tls

    def _register(self, fd: int, old: int, new: int) -> None:
        # A registration with no events would still report hang-ups, over and
        # over, to a direction that cannot act on them yet: remove it instead.
        if not old:
            self._epoll.register(fd, new)
        elif not new:
            self._epoll.unregister(fd)
        else:
            self._epoll.modify(fd, new)

    def _drop(self, flow: Flow) -> None:
        for fd, mask in ((flow.pfd, flow.pmask), (flow.tfd, flow.tmask)):
            if mask:
                with contextlib.suppress(OSError, ValueError):
                    self._epoll.unregister(fd)
            if self._flows.get(fd) is flow:
                del self._flows[fd]
        flow.pmask = flow.tmask = 0
        flow.release()

    def _finish(self, flow: Flow, result: outcome.Outcome[None]) -> None:
        self._drop(flow)
        if flow.result is not None:
            return
        flow.result = result
        if flow.task is not None:
            trio.lowlevel.reschedule(flow.task, result)
