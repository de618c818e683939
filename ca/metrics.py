"""Prometheus metrics of the authority (`meshid ca serve --metrics HOST:PORT`).

One registry per worker process, no globals. Counters are bumped by a single
hook where a reply is decided (`observe_reply`): the path, status and reason
of the reply say whether an enrollment or a renewal succeeded, what was
refused and why. Values that live elsewhere (pools, parked watches) are read
at scrape time by a collector; the root's horizon is read from the database
by the poller, once a second, in the database thread (`refresh`), never by a
scrape on the event loop.

With `--workers N`, each worker keeps its own counters and serves them on its
own metrics port: HOST:PORT for worker 0, PORT+1 for worker 1, and so on
(port 0 gives each worker a port of its own, each logged in a
`metrics_serving` line). Prometheus scrapes every worker and sums with
`sum without (instance)`; no file-backed multiprocess mode, no shared state
between the workers beyond what they already share.

The listener is `adminhttp`'s: GET and HEAD only, deadlines, connection caps
and one failure boundary per connection, like the sidecar's admin listener.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any, TypeVar

import trio
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from adminhttp import AdminLimits, Response, register_process_metrics, serve_admin_listeners
from ca.authority import Authority
from meshid.clock import Clock
from meshid.events import EventLog
from meshid.version import VERSION

T = TypeVar("T")

# Paths a label may carry; anything else is "other", so a scanner cannot grow the series.
KNOWN_PATHS = frozenset(
    {"/v1/enroll", "/v1/renew", "/v1/report", "/v1/bundle", "/v1/watch", "/healthz"}
)
DB_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
EXPOSITION_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Seconds between two reads of the sidecars' reports (each parses every stored report).
REPORTS_EVERY = 30.0


@dataclass(frozen=True, slots=True)
class RootSnapshot:
    """What the poller last read of the roots, for the scrape to report."""

    active_generation: int
    active_not_after: datetime
    next_state: str  # "none", "waiting_for_acks" or "scheduled"


@dataclass(frozen=True, slots=True)
class FleetSnapshot:
    """What the sidecars last reported, read every REPORTS_EVERY seconds."""

    reporting: int
    earliest_svid_not_after: datetime | None


@dataclass(frozen=True, slots=True)
class Live:
    """What the scrape-time collector reads from the control plane."""

    pools: Callable[[], Mapping[str, int]]
    watches: Callable[[], int]


class _LiveCollector(Collector):
    def __init__(self, metrics: CaMetrics, live: Live) -> None:
        self._metrics = metrics
        self._live = live

    def collect(self) -> Iterator[GaugeMetricFamily]:
        pools = GaugeMetricFamily(
            "meshid_ca_connections",
            "Connections open now, by pool (anonymous: no client certificate yet)",
            labels=["pool"],
        )
        for pool, count in sorted(self._live.pools().items()):
            pools.add_metric([pool], count)
        yield pools
        yield GaugeMetricFamily(
            "meshid_ca_watches",
            "Watches open now (long polls parked, and streams)",
            value=self._live.watches(),
        )
        fleet = self._metrics.fleet
        if fleet is not None:
            yield GaugeMetricFamily(
                "meshid_ca_reporting_sidecars",
                "Sidecar instances whose status reports the authority keeps",
                value=fleet.reporting,
            )
            if fleet.earliest_svid_not_after is not None:
                left = (fleet.earliest_svid_not_after - self._metrics.clock.wall()).total_seconds()
                yield GaugeMetricFamily(
                    "meshid_ca_sidecar_svid_expiry_seconds",
                    "Seconds until the earliest SVID among reporting sidecars expires",
                    value=left,
                )
        root = self._metrics.root
        if root is None:
            return
        left = (root.active_not_after - self._metrics.clock.wall()).total_seconds()
        yield GaugeMetricFamily(
            "meshid_ca_root_expiry_seconds",
            "Seconds until the active root expires (negative once it has)",
            value=left,
        )
        yield GaugeMetricFamily(
            "meshid_ca_root_generation",
            "Generation of the active root",
            value=root.active_generation,
        )
        state = GaugeMetricFamily(
            "meshid_ca_next_root",
            "1 for the state the next root is in: none, scheduled or waiting_for_acks",
            labels=["state"],
        )
        for name in ("none", "scheduled", "waiting_for_acks"):
            state.add_metric([name], 1 if name == root.next_state else 0)
        yield state


class CaMetrics:
    """The metrics of one worker; `live` is given by the control plane that owns the pools."""

    def __init__(self, clock: Clock, live: Live) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.clock = clock
        self.root: RootSnapshot | None = None
        self.fleet: FleetSnapshot | None = None
        self._fleet_read_at = -REPORTS_EVERY
        self.registry = CollectorRegistry(auto_describe=False)
        register_process_metrics(self.registry, "authority")
        self.enrollments = Counter(
            "meshid_ca_enrollments",
            "Enrollments answered, by result (issued, or the refusal's reason)",
            ["result"],
            registry=self.registry,
        )
        self.renewals = Counter(
            "meshid_ca_renewals",
            "Renewals answered, by result (issued, or the refusal's reason)",
            ["result"],
            registry=self.registry,
        )
        self.refusals = Counter(
            "meshid_ca_refusals",
            "Requests refused or failed (status 400 and up), by reason",
            ["reason"],
            registry=self.registry,
        )
        self.svids_issued = Counter(
            "meshid_ca_svids_issued", "SVIDs issued to workloads", registry=self.registry
        )
        self.requests = Counter(
            "meshid_ca_http_requests",
            "HTTP requests answered, by path and status",
            ["path", "status"],
            registry=self.registry,
        )
        self.db_seconds = Histogram(
            "meshid_ca_db_call_seconds",
            "Database calls, from the request to the answer (queueing for the thread included)",
            buckets=DB_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_LiveCollector(self, live))

    def observe_reply(self, path: str, status: int, reason: object) -> None:
        """Count one reply; `reason` is the reply's `error` field (None on success)."""
        label = path if path in KNOWN_PATHS else "other"
        self.requests.labels(label, str(status)).inc()
        result = "issued" if status == 200 else str(reason or f"status_{status}")
        if status >= 400:
            self.refusals.labels(str(reason or f"status_{status}")).inc()
        if path == "/v1/enroll":
            self.enrollments.labels(result).inc()
        elif path == "/v1/renew":
            self.renewals.labels(result).inc()
        else:
            return
        if status == 200:
            self.svids_issued.inc()

    async def timed(self, call: Awaitable[T]) -> T:
        """Await a database call and record how long it took."""
        start = self.clock.monotonic()
        try:
            return await call
        finally:
            self.db_seconds.observe(self.clock.monotonic() - start)

    def refresh(self, authority: Authority) -> None:
        """Read the roots' state for the next scrapes. Runs in the database thread."""
        active, pending = authority.root_lifecycle()
        if pending is None:
            state = "none"
        elif pending.wait_for_acks:
            state = "waiting_for_acks"
        else:
            state = "scheduled"
        self.root = RootSnapshot(active.generation, active.not_after, state)
        now = self.clock.monotonic()
        if now - self._fleet_read_at >= REPORTS_EVERY:
            self._fleet_read_at = now
            reports, _ = authority.reports()
            expiries = [r.report.svid_not_after for r in reports if r.report.svid_not_after]
            self.fleet = FleetSnapshot(len(reports), min(expiries, default=None))

    def route(self, method: str, path: str) -> Response:
        """The metrics listener's router: /metrics, /healthz and /version."""
        if path == "/metrics":
            return Response(200, generate_latest(self.registry), EXPOSITION_TYPE)
        if path == "/healthz":
            return Response(200, b"ok\n")
        if path == "/version":
            return Response(200, VERSION.encode() + b"\n")
        return Response(404, b"not found\n")


class _Log(EventLog):
    """The listener logs through the control plane's `log(event, **fields)`."""

    def __init__(self, log: Callable[..., None]) -> None:
        self._log = log

    def emit(self, event: str, **fields: Any) -> None:
        self._log(event, **fields)


async def serve_metrics(
    sock: socket.socket,
    metrics: CaMetrics,
    log: Callable[..., None],
    *,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve /metrics on `sock` (bound and listening) until cancelled; logs where."""
    await serve_routes(sock, metrics.route, log, "metrics_serving", task_status=task_status)


async def serve_routes(
    sock: socket.socket,
    route: Callable[[str, str], Response],
    log: Callable[..., None],
    event: str,
    *,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """A plain-HTTP listener of the authority's (metrics, the service graph) on `sock`,
    with the shared admin listener's limits, until cancelled; logs `event` with where."""
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    host, port = sock.getsockname()[:2]
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    async with trio.open_nursery() as nursery:
        await nursery.start(
            partial(
                serve_admin_listeners,
                [listener],
                route,
                limits=AdminLimits(),
                events=_Log(log),
            )
        )
        log(event, listen=where, version=VERSION)
        task_status.started((str(host), int(port)))
