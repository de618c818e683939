"""Prometheus metrics for one sidecar, in a registry of its own (no globals).

Counters for decisions and failures are bumped where they happen; the
latency histograms (TLS handshakes, connects to the app or the upstream) are
filled by `timed_handshake` and `timed_connect`, which wrap the awaited call
so the data path needs one line per hook. Values
that already live elsewhere (live connections and bytes in the registry,
SVID expiry, policy version) are read at scrape time by a collector, so the
data path never touches a metric object.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TypeVar

import trio
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from adminhttp import register_process_metrics
from sidecar.peer import INBOUND, OUTBOUND
from sidecar.registry import Registry

T = TypeVar("T")
M = TypeVar("M", Counter, Histogram)
# Seconds: loopback connects take microseconds, a handshake across a region tens of ms.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


@dataclass(frozen=True, slots=True)
class Gauges:
    """What the scrape-time collector reads."""

    registry: Registry
    svid_seconds_left: Callable[[], float | None]
    policy_version: Callable[[], int]
    bundle_sequence: Callable[[], int]
    quarantined: Callable[[], int]
    # Dynamic mode only: whether the state directory takes writes, and failed writes by kind.
    state_dir_writable: Callable[[], bool | None] = lambda: None
    state_write_failures: Callable[[], Mapping[str, int]] = lambda: {}
    # What /readyz answers: started, with an SVID that has not expired.
    ready: Callable[[], bool | None] = lambda: None
    # Dynamic mode only: each authority server, and whether it is the one in use.
    authority_servers: Callable[[], Mapping[str, bool]] = lambda: {}


class _LiveCollector(Collector):
    def __init__(self, gauges: Gauges) -> None:
        self._gauges = gauges

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        g = self._gauges
        live = GaugeMetricFamily(
            "meshid_live_connections", "Connections open now", labels=["direction"]
        )
        traffic = CounterMetricFamily(
            "meshid_bytes",
            "Bytes proxied (in: from the peer, out: to the peer)",
            labels=["direction", "flow"],
        )
        for direction in (INBOUND, OUTBOUND):
            live.add_metric([direction], g.registry.count(direction))
            bytes_in, bytes_out = g.registry.bytes_total(direction)
            traffic.add_metric([direction, "in"], bytes_in)
            traffic.add_metric([direction, "out"], bytes_out)
        yield live
        yield traffic
        left = g.svid_seconds_left()
        if left is not None:
            yield GaugeMetricFamily(
                "meshid_svid_expiry_seconds", "Seconds until the current SVID expires", value=left
            )
        yield GaugeMetricFamily(
            "meshid_policy_version", "Version of the allow-list in force", value=g.policy_version()
        )
        yield GaugeMetricFamily(
            "meshid_bundle_sequence",
            "Sequence of the trust bundle in force",
            value=g.bundle_sequence(),
        )
        yield GaugeMetricFamily(
            "meshid_quarantined_peers",
            "Peers blocked after repeated failures",
            value=g.quarantined(),
        )
        ready = g.ready()
        if ready is not None:
            yield GaugeMetricFamily(
                "meshid_ready", "1 while /readyz answers 200, else 0", value=1 if ready else 0
            )
        servers = g.authority_servers()
        if servers:
            in_use = GaugeMetricFamily(
                "meshid_authority_server",
                "1 for the authority server in use now, 0 for the others it may fail over to",
                labels=["server"],
            )
            for server, used in servers.items():
                in_use.add_metric([server], 1 if used else 0)
            yield in_use
        writable = g.state_dir_writable()
        if writable is not None:
            yield GaugeMetricFamily(
                "meshid_state_dir_writable",
                "1 while every state file is saved, 0 while a write to state_dir is failing",
                value=1 if writable else 0,
            )
            failures = CounterMetricFamily(
                "meshid_state_write_failures",
                "Writes to state_dir that failed (disk full, read-only, I/O error), by file kind",
                labels=["what"],
            )
            for what, count in sorted(g.state_write_failures().items()):
                failures.add_metric([what], count)
            yield failures


def _remember_children(metric: M) -> M:
    """`metric.labels`, remembering each child it returns.

    prometheus_client validates the values and takes a lock on every call
    (about 5 µs); a new connection asks four or five times, always for one
    of the same few children (directions and reasons are fixed sets). The
    child for given values never changes, so remembering it changes nothing
    else. Named values go the long way.
    """
    labels = metric.labels
    children: dict[tuple[object, ...], M] = {}

    def remembered(*values: object, **named: object) -> M:
        if named:
            return labels(*values, **named)
        child = children.get(values)
        if child is None:
            child = children[values] = labels(*values)
        return child

    metric.labels = remembered  # type: ignore[method-assign]
    return metric


class Metrics:
    def __init__(self, gauges: Gauges) -> None:
        # `*_created` series double the output and no dashboard of ours reads them.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry(auto_describe=False)
        register_process_metrics(self.registry, "sidecar")
        self.handshake_seconds = _remember_children(
            Histogram(
                "meshid_handshake_seconds",
                "TLS handshakes that completed, by direction: how long they took",
                ["direction"],
                buckets=LATENCY_BUCKETS,
                registry=self.registry,
            )
        )
        self.connect_seconds = _remember_children(
            Histogram(
                "meshid_connect_seconds",
                "TCP connects that succeeded (inbound: to the app, outbound: to the upstream)",
                ["direction"],
                buckets=LATENCY_BUCKETS,
                registry=self.registry,
            )
        )
        self.connections = _remember_children(
            Counter(
                "meshid_connections",
                "Connection decisions",
                ["direction", "decision", "reason"],
                registry=self.registry,
            )
        )
        self.handshake_failures = _remember_children(
            Counter(
                "meshid_handshake_failures",
                "TLS handshakes that failed or were refused",
                ["direction", "reason"],
                registry=self.registry,
            )
        )
        self.closes = _remember_children(
            Counter(
                "meshid_connections_closed",
                "Connections closed, by reason",
                ["direction", "reason"],
                registry=self.registry,
            )
        )
        self.renewals = Counter(
            "meshid_svid_renewals",
            "SVID renewals and reloads",
            ["result"],
            registry=self.registry,
        )
        self.failovers = Counter(
            "meshid_authority_failovers",
            "Moves from one authority server to the next, by the reason of the failure",
            ["reason"],
            registry=self.registry,
        )
        self.policy_updates = Counter(
            "meshid_policy_updates", "Allow-list updates applied", registry=self.registry
        )
        self.quarantines = Counter(
            "meshid_peer_quarantines",
            "Peers blocked after repeated refusals, by what identified them",
            ["kind"],
            registry=self.registry,
        )
        self.registry.register(_LiveCollector(gauges))

    async def timed_handshake(self, direction: str, handshake: Awaitable[T]) -> T:
        """Await a TLS handshake; record its duration if it completes."""
        return await _timed(self.handshake_seconds.labels(direction), handshake)

    async def timed_connect(self, direction: str, connect: Awaitable[T]) -> T:
        """Await a TCP connect; record its duration if it succeeds."""
        return await _timed(self.connect_seconds.labels(direction), connect)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


async def _timed(histogram: Histogram, call: Awaitable[T]) -> T:
    """Failures are counted by reason elsewhere; a latency is only that of a success."""
    start = trio.current_time()
    result = await call
    histogram.observe(trio.current_time() - start)
    return result
