"""The sidecar process: the composition root, and the few answers only the whole can give.

It builds the objects and injects the one clock (`meshid.clock`): the state
holder (`sidecar.state`), the gate (`sidecar.gate`), one connection's life
(`sidecar.connection`), the identity source (`sidecar.static` or
`sidecar.dynamic`), and runs their tasks, each background duty inside its
failure boundary (`sidecar.tasks`). What stays here: swapping credentials
and policy in (a policy change closes exactly the live connections it now
denies), the sweep of idle and expired connections, the admin answers, and
the lifecycle. Installing a policy and re-judging live connections under it
is `sidecar.enforcement`'s.

Theory of operation. `Sidecar.run` opens the admin listener first (so
/healthz answers, and /readyz says why not ready, while the sidecar waits for
its authority), then loads credentials, binds every listener, and only then
reports started (and /readyz turns 200); the admin listener closes last.
SIGTERM drains: stop accepting, let live connections finish up to
`drain_timeout`, then cut.

What a mode does not use is not imported: the control plane client
(`sidecar.dynamic`), the static files' watcher (`sidecar.static`), the
Workload API (gRPC, HTTP/2, JWT) and transparent capture are imported when
the config asks for them, so an idle sidecar holds only what it runs.
"""

from __future__ import annotations

import functools
import json
import socket
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import trio

from adminhttp import Throttle
from meshid.clock import Clock
from meshid.errors import MeshIdError
from meshid.policy import Policy
from meshid.reasons import Reason
from meshid.report import StatusReport
from meshid.spiffeid import SpiffeId
from meshid.version import VERSION
from sidecar.admin import Response, serve_admin
from sidecar.config import SidecarConfig, StaticSource
from sidecar.connection import Connections
from sidecar.credentials import Generation, Svid
from sidecar.enforcement import Enforcement
from sidecar.events import EventLog
from sidecar.gate import Gate
from sidecar.lifecycle import DRAINING, SERVING, STOPPED, Lifecycle
from sidecar.metrics import Gauges, Metrics
from sidecar.peer import (
    INBOUND,
    OUTBOUND,
)
from sidecar.pump import Pump
from sidecar.quarantine import Quarantine
from sidecar.registry import LiveConnection, Registry
from sidecar.rejudge import REJUDGE_CHUNK
from sidecar.sockets import (
    bind,
    fmt_addr,
)
from sidecar.state import Current, IdentitySource
from sidecar.status import build_report
from sidecar.tasks import keep_running

if TYPE_CHECKING:
    from sidecar.capture import Capture
    from sidecar.dynamic import DynamicIdentity
    from sidecar.renewal import Pacing
    from sidecar.workload.run import Prepared as PreparedWorkloadApi
    from sidecar.workload.run import WorkloadApi


class Sidecar(Enforcement):
    def __init__(
        self,
        config: SidecarConfig,
        *,
        events: EventLog | None = None,
        clock: Clock | None = None,
        reload_interval: float = 1.0,
        sweep_interval: float = 1.0,
        pacing: Pacing | None = None,
    ) -> None:
        self.config = config
        self.pacing = pacing  # how the control-plane duties retry (dynamic mode)
        self.lifecycle = Lifecycle()
        self.identity = config.identity
        self.limits = config.limits
        self.events = events if events is not None else EventLog()
        self.clock = clock if clock is not None else Clock()
        self.wall = self.clock.wall  # the one wall clock: OpenSSL checks no times itself
        self.skew = timedelta(seconds=config.limits.clock_skew)
        self.current = Current(self.identity, self.clock, self.skew)
        self.reload_interval = reload_interval
        self.sweep_interval = sweep_interval
        self.registry = Registry()
        # A change that makes more (direction, peer) groups to judge than this is judged
        # by the re-judge duty, a chunk at a time with a checkpoint in between, so that
        # 20,000 live connections never hold up the event loop for long.
        self.rejudge_chunk = REJUDGE_CHUNK
        self._rejudge_wanted: trio.Event | None = None  # set while the duty runs
        self._rejudge_restarts = 0
        self.pump = Pump()
        self.quarantine = Quarantine(
            identity_failures=config.limits.quarantine_failures,
            address_failures=config.limits.quarantine_address_failures,
            window=config.limits.quarantine_window,
            block=config.limits.quarantine_period,
        )
        self.ready = False
        self.draining = False
        self.bound: dict[str, tuple[str, int]] = {}
        self._drain = trio.Event()
        self.stopped = trio.Event()
        self._accept_scopes: list[trio.CancelScope] = []
        self.dynamic: DynamicIdentity | None = None
        self.changed: Callable[[], None] = lambda: None  # live connections or policy moved
        self.svid_listeners: list[Callable[[Svid], None]] = []  # e.g. the Workload API
        self.workload_api: WorkloadApi | None = None
        self.metrics = Metrics(
            Gauges(
                registry=self.registry,
                svid_seconds_left=self.svid_seconds_left,
                policy_version=lambda: self.policy.version,
                bundle_sequence=lambda: (
                    self.generation.svid.bundle.sequence if self.generation else 0
                ),
                quarantined=lambda: len(self.gate.quarantined()),
                state_dir_writable=lambda: self.dynamic.state.writable if self.dynamic else None,
                state_write_failures=lambda: self.dynamic.state.failures if self.dynamic else {},
                ready=lambda: self._readiness()[0] == 200,  # as /readyz
                authority_servers=self.authority_servers,
            )
        )
        self.throttle = Throttle(trio.current_time)  # log lines that could come in a flood
        self.gate = Gate(
            self.current,
            self.quarantine,
            self.metrics,
            self.events,
            handshake_timeout=self.limits.handshake_timeout,
            max_connections=self.limits.max_connections,
            changed=lambda: self.changed(),
        )

        self.connections = Connections(
            self.current,
            self.gate,
            self.registry,
            self.pump,
            self.metrics,
            self.events,
            self.limits,
            throttle=self.throttle,
            changed=lambda: self.changed(),
        )
        self.capture: Capture | None = None
        if config.transparent:
            from sidecar.capture import Capture  # only a transparent sidecar captures

            self.capture = Capture(self.connections, config.transparent)

    @property
    def generation(self) -> Generation | None:
        return self.current.generation

    @property
    def policy(self) -> Policy:
        return self.current.policy

    # -- credentials and policy ------------------------------------------------

    def svid_seconds_left(self) -> float | None:
        return self.current.svid_seconds_left()

    def install_svid(self, svid: Svid, how: str) -> None:
        """Swap in new credentials; live connections keep the generation they started with."""
        number = self.current.next_generation()
        self.current.generation = Generation.build(
            number, svid, self.gate.verify, self.clock.monotonic()
        )
        for listener in self.svid_listeners:
            listener(svid)
        self.events.emit(
            "credentials",
            how=how,
            spiffe_id=str(svid.spiffe_id),
            serial=f"{svid.serial:x}",
            not_after=svid.not_after.isoformat(),
            generation=number,
        )

    def current_svid(self) -> Svid | None:
        return self.current.svid()

    def wall_now(self) -> datetime:
        return self.current.wall()

    def current_policy(self) -> Policy:
        return self.policy

    def count_renewal(self, result: str) -> None:
        self.metrics.renewals.labels(result=result).inc()

    def count_failover(self, reason: str) -> None:
        self.metrics.failovers.labels(reason=reason).inc()

    def authority_servers(self) -> dict[str, bool]:
        """Each of the authority's servers, and whether it is the one in use (dynamic mode)."""
        if self.dynamic is None:
            return {}
        in_use = self.dynamic.link.in_use()
        return {str(a): a == in_use for a in self.dynamic.link.servers()}

    def install_addresses(self, addresses: Mapping[tuple[str, int], SpiffeId]) -> None:
        """The address map from the feed, for captured connections (none without [transparent])."""
        if self.capture is not None:
            self.capture.install_map(addresses)

    # -- decisions -------------------------------------------------------------

    def status_report(self, instance: str) -> StatusReport:
        """What the control plane hears every few seconds (see sidecar/status.py)."""
        return build_report(
            instance,
            self.current_svid(),
            self.policy,
            self.registry.live(),
            len(self.registry),
            self.gate.quarantined(),
            self.gate.refusals.recent(trio.current_time()),
            advertise=self.capture.advertised() if self.capture is not None else (),
        )

    # -- background duties -----------------------------------------------------

    async def _sweep(self) -> None:
        """Idle timeout and peer-certificate expiry for live connections."""
        while True:
            await trio.sleep(self.sweep_interval)
            overdue = self._overdue(trio.current_time(), self.wall())
            self.registry.close_where(self.gate.cutting(overdue))

    def _overdue(self, now: float, wall: datetime) -> Callable[[LiveConnection], str | None]:
        idle = self.limits.idle_timeout
        expiry = self.limits.close_on_peer_expiry

        def overdue(entry: LiveConnection) -> str | None:
            if now - entry.last_activity > idle:
                return Reason.IDLE_TIMEOUT
            if expiry and entry.peer_not_after is not None and wall > entry.peer_not_after:
                return Reason.PEER_CERTIFICATE_EXPIRED
            return None

        return overdue

    # -- admin -----------------------------------------------------------------

    def route(self, method: str, path: str) -> Response:
        if method not in ("GET", "HEAD"):
            return Response(405, b"method not allowed\n")
        if path == "/healthz":
            return Response(200, b"ok\n")
        if path == "/readyz":
            status, text = self._readiness()
            return Response(status, text.encode())
        if path == "/metrics":
            return Response(
                200, self.metrics.exposition(), "text/plain; version=0.0.4; charset=utf-8"
            )
        if path == "/svid":
            if self.generation is None:
                why = self._readiness()[1].splitlines()[0].removeprefix("not ready: ")
                missing = {"error": "no_credentials", "detail": f"no credentials yet: {why}"}
                return Response(503, json.dumps(missing).encode() + b"\n", "application/json")
            svid = self.generation.svid
            body = {
                "spiffe_id": str(svid.spiffe_id),
                "serial": f"{svid.serial:x}",
                "not_before": svid.leaf.not_valid_before_utc.isoformat(),
                "not_after": svid.not_after.isoformat(),
                "seconds_left": round(self.svid_seconds_left() or 0.0, 1),
                "bundle_sequence": svid.bundle.sequence,
                "policy_version": self.policy.version,
            }
            return Response(200, json.dumps(body).encode() + b"\n", "application/json")
        return Response(404, b"not found\n")

    def _readiness(self) -> tuple[int, str]:
        """/readyz: why not ready, else ready; a full state_dir is said but does not stop it."""
        return self.lifecycle.answer(
            now=trio.current_time(),
            svid_seconds_left=self.svid_seconds_left(),
            revoked=self.identity in self.policy.revoked,
            degraded=self.dynamic.state.describe() if self.dynamic else None,
            authority=self._authority_note(),
        )

    def _authority_note(self) -> str | None:
        """Which of several authority servers is in use; nothing to say with only one."""
        if self.dynamic is None or len(self.dynamic.link.clients) == 1:
            return None
        link = self.dynamic.link
        return f"{link.in_use()} ({link.choice.index + 1} of {len(link.clients)})"

    # -- lifecycle -------------------------------------------------------------

    def request_drain(self) -> None:
        self._drain.set()

    async def run(
        self, *, task_status: trio.TaskStatus[Sidecar] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Admin listener first, then credentials and listeners; the admin listener goes last.

        Our own errors (a permanent enrollment failure, a port in use) leave as
        themselves, not wrapped in the admin nursery's exception group.
        """
        failure: MeshIdError | None = None
        try:
            async with trio.open_nursery() as admin_nursery:
                if self.config.admin is not None:
                    admin = await admin_nursery.start(
                        functools.partial(serve_admin, events=self.events),
                        self.config.admin,
                        self.route,
                    )
                    self.bound["admin"] = admin[0].socket.getsockname()[:2]
                    self.events.emit("admin_listening", listen=fmt_addr(self.bound["admin"]))
                try:
                    await self._serve(task_status)
                except MeshIdError as exc:
                    failure = exc
                admin_nursery.cancel_scope.cancel()
        finally:
            self.ready = False
            self.lifecycle.phase = STOPPED
            self.stopped.set()
        if failure is not None:
            raise failure

    async def _serve(self, task_status: trio.TaskStatus[Sidecar]) -> None:
        source = self.config.source
        identity: IdentitySource
        if isinstance(source, StaticSource):
            from sidecar.static import StaticIdentity  # each mode imports its own source

            identity = StaticIdentity(
                source,
                self.current,
                self.events,
                install_svid=self.install_svid,
                install_policy=self.install_policy,
                count_renewal=self.count_renewal,
                interval=self.reload_interval,
                throttle=self.throttle,
            )
        else:
            from sidecar.control import ControlClient
            from sidecar.controlpool import POOL_SIZE
            from sidecar.dynamic import DynamicIdentity

            self.dynamic = DynamicIdentity(
                self,
                self.current,
                source,
                client=[
                    ControlClient(
                        server.host,
                        server.port,
                        self.identity.trust_domain,
                        skew=self.skew,
                        mark=self.config.transparent.mark if self.config.transparent else None,
                        pool_size=POOL_SIZE,
                    )
                    for server in source.servers
                ],
                pacing=self.pacing,
            )
            self.changed = self.dynamic.poke
            identity = self.dynamic
        await identity.start()
        listeners: list[tuple[socket.socket, Callable[..., Awaitable[None]], str]] = []
        workload: PreparedWorkloadApi | None = None
        try:
            for i, ib in enumerate(self.config.inbound):
                lsock = bind(ib.listen)
                self.bound[f"inbound[{i}]"] = lsock.getsockname()[:2]
                listeners.append((lsock, self.connections.inbound_handler(ib), INBOUND))
            for i, ob in enumerate(self.config.outbound):
                lsock = bind(ob.listen)
                self.bound[f"outbound[{i}]"] = lsock.getsockname()[:2]
                listeners.append((lsock, self.connections.outbound_handler(ob), OUTBOUND))
            if self.capture is not None:
                self.capture.bind(listeners, self.bound)
            if self.config.workload_api is not None:  # bound here: a config error stays one line
                from sidecar.workload.run import prepare_workload_api  # gRPC, h2, JWT

                workload = prepare_workload_api(self.config.workload_api)
            async with trio.open_nursery() as nursery:
                await nursery.start(self.pump.run)
                for lsock, handler, direction in listeners:
                    scope = trio.CancelScope()
                    self._accept_scopes.append(scope)
                    nursery.start_soon(
                        self.connections.accept_loop, lsock, scope, nursery, handler, direction
                    )
                for task, duty in (
                    ("sweep", self._sweep),
                    ("rejudge", self._rejudge),
                    (identity.task, identity.run),
                ):
                    nursery.start_soon(keep_running, task, duty, self.events, self.throttle)
                if workload is not None:
                    from sidecar.workload.run import serve_workload_api

                    self.workload_api = await nursery.start(
                        functools.partial(
                            serve_workload_api,
                            self,
                            workload,
                            self.dynamic.call if self.dynamic is not None else None,
                            registry=self.metrics.registry,
                        )
                    )
                self.ready = True
                self.lifecycle.phase = SERVING
                self.events.emit(
                    "started",
                    version=VERSION,
                    spiffe_id=str(self.identity),
                    listeners={k: fmt_addr(v) for k, v in self.bound.items()},
                )
                task_status.started(self)
                await self._drain.wait()
                await self._shutdown(listeners, nursery)
        finally:
            for lsock, _, _ in listeners:
                lsock.close()
            if workload is not None:
                workload.close()
            self.ready = False

    async def _shutdown(
        self,
        listeners: list[tuple[socket.socket, Callable[..., Awaitable[None]], str]],
        nursery: trio.Nursery,
    ) -> None:
        self.ready = False
        self.lifecycle.phase = DRAINING
        self.draining = True
        for scope in self._accept_scopes:
            scope.cancel()
        for lsock, _, _ in listeners:
            trio.lowlevel.notify_closing(lsock)
            lsock.close()
        live = len(self.registry)
        self.events.emit("draining", live_connections=live, timeout_s=self.limits.drain_timeout)
        with trio.move_on_after(self.limits.drain_timeout):
            await self.registry.wait_empty()
        left = len(self.registry)
        if left:
            self.registry.close_all(Reason.DRAIN_TIMEOUT)
            with trio.move_on_after(5):
                await self.registry.wait_empty()
        self.events.emit("stopped", drained=live - left, cut=left)
        nursery.cancel_scope.cancel()
