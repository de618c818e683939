"""Control-plane fan-out: one `meshid ca serve` against N simulated sidecars.

    python -m bench.fanout --sizes 100,1000            # what `make bench` runs
    python -m bench.fanout --sizes 10000               # long: `make bench FANOUT_SIZES=10000`

Theory of operation:

- One real authority process (its own state directory, a free port picked
  here and kept across the restart, the Prometheus listener on). The
  allow-list is a ring (sidecar i may call i+1), applied in one transaction;
  the N join tokens are made through the library (`Authority.create_token`).
- One trio process simulates the N sidecars with the sidecar's own wire code:
  `sidecar.control.ControlClient` for every request (its mTLS connections kept
  alive between requests, as the real sidecar keeps them), `meshid.wire` requests,
  `meshid.feedwire.Feed` to read the feed, and the backoff of
  `sidecar.schedule.Schedule` / `sidecar.renewal.Pacing` after a failure. Each
  enrolls with a real CSR, then keeps one streamed watch open (deltas once it
  holds a feed), as a sidecar does.
- The fleet rolls out, it does not stampede: at most ENROLL_CONCURRENCY
  enrollments are in flight at once. And the generator itself is one process
  for N sidecars that each have a CPU of their own: a simulated sidecar starts
  connecting (and its connect timeout) when one of HANDSHAKES places is free,
  so that what times out is the authority, not the generator's event loop
  (thousands of interleaved handshakes made every one of them miss the
  sidecar's 3 s connect timeout, and the authority log them as aborted).
- Each simulated sidecar connects from a loopback address of its own
  (127.1.0.0 up): in a mesh every pod has its own address, and the authority
  caps anonymous connections per source address (`max_per_source`), which a
  whole fleet squeezed into 127.0.0.1 would hit during every reconnect storm
  without it saying anything about the authority's real capacity.
- Measured: the authority's RSS idle and with N watches parked (per sidecar),
  the time from `meshid policy deny` returning to each sidecar holding the new
  policy version, and after SIGTERM and a fresh start, the time until every
  sidecar renewed its SVID and parked its watch again. Refusals and errors are
  counted by reason, on both sides.
- Results per N merge into `bench/fanout.json` (a run of some sizes keeps the
  others), from which the section in `bench/RESULTS.md` and the plot
  `bench/fanout.png` are drawn (matplotlib, from the optional `bench` extra).

Every phase has a deadline, every loop a count bound; the processes started
here are stopped by pid (`bench.procs.Supervisor`).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import gc
import json
import math
import random
import re
import resource
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import trio

from bench.procs import (
    Proc,
    Supervisor,
    cpu_seconds,
    free_ports,
    raise_nofile,
    rss_kib,
    wait_listening,
)
from ca.authority import Authority
from meshid.clock import system_clock
from meshid.feedwire import DeltaMismatch, Feed
from meshid.spiffeid import SpiffeId, TrustDomain
from meshid.svid import generate_key, key_to_pem
from meshid.wire import ENROLL, RENEW, EnrollRequest, RenewRequest, SvidReply, WatchQuery
from sidecar.control import (
    ClientIdentity,
    ControlClient,
    ControlPlaneError,
    HeldIdentity,
)
from sidecar.controlpool import POOL_SIZE, Kept
from sidecar.renewal import WATCH_WAIT, Pacing, build_csr

TD = TrustDomain("fanout.example")
MESHID = str(Path(sys.executable).with_name("meshid"))
ENROLL_CONCURRENCY = 64  # enrollments in flight at once (a fleet rolling out, not a stampede)
# TLS handshakes the load generator runs at once. Each real sidecar has a CPU of its own and
# starts its connect timeout when it starts connecting; N simulated ones share one event
# loop, and with thousands of handshakes interleaved in it each would take seconds of the
# generator's time and overrun the sidecar's connect timeout for reasons of the bench's own.
# So a simulated sidecar starts connecting (and its timeout) when one of these is free.
HANDSHAKES = 32
# Waiting for one of those places is part of a request's deadline (the client's timer starts
# first), so the simulated requests get this much room beyond the sidecar's own deadlines:
# after a restart all N queue there at once, and a watch that gave up in the queue would
# only join it again at the back.
GATE_ALLOWANCE = 600.0
MAX_POLLS = 10_000  # watches one simulated sidecar makes in a run, at most
# The generator's young generation is collected every GC_YOUNG allocations, not every 700:
# with 10,000 sidecars' connections alive, the collector took half of the generator's CPU.
GC_YOUNG = 50_000
MARKER = "<!-- fanout: written by python -m bench.fanout -->"
RESULTS = Path("bench/fanout.json")


def source_address(index: int) -> str:
    """The loopback address simulated sidecar `index` connects from: 127.1.0.0 up."""
    return f"127.{1 + index // 65536}.{index // 256 % 256}.{index % 256}"


class SourcedClient(ControlClient):
    """The sidecar's control-plane client, bound to one loopback source address.

    It keeps its TLS context while its SVID and bundle stay the same (the real
    sidecar builds one per request): that is the load generator's cost, not the
    authority's, and the machine is shared between them.
    """

    def __init__(self, host: str, port: int, source: str, gate: trio.CapacityLimiter) -> None:
        super().__init__(host, port, TD, timeout=60.0 + GATE_ALLOWANCE, pool_size=POOL_SIZE)
        self.source = source
        self.gate = gate  # shared by the fleet: see HANDSHAKES
        self._held: tuple[tuple[bytes, object], ssl.SSLContext] | None = None

    async def _open_tcp(self) -> trio.SocketStream:
        return await trio.open_tcp_stream(self.host, self.port, local_address=self.source)

    async def _connect(
        self,
        bundle_pem: bytes,
        identity: ClientIdentity | HeldIdentity | None,
        key: bytes | None,
        now: datetime,
        trust: str,
    ) -> Kept:
        async with self.gate:
            return await super()._connect(bundle_pem, identity, key, now, trust)

    def _context(
        self, bundle_pem: bytes, identity: ClientIdentity | HeldIdentity | None
    ) -> ssl.SSLContext:
        key = (bundle_pem, identity)
        if self._held is None or self._held[0] != key:
            self._held = (key, super()._context(bundle_pem, identity))
        return self._held[1]


@dataclass(eq=False)
class Sim:
    """One simulated sidecar: its identity, its SVID, and what it saw when."""

    index: int
    identity: SpiffeId
    token: str
    client: SourcedClient
    held: HeldIdentity | None = None
    bundle: bytes = b""
    bundle_sequence: int = 0
    versions: tuple[int, int, int] = (-1, -1, -1)
    feed: Feed | None = None  # the whole feed held, which a delta applies to
    seen: dict[int, float] = field(default_factory=dict)  # policy version -> first seen
    renew_due: bool = False
    renewed_at: float | None = None
    polls: int = 0


@dataclass
class Fleet:
    """The simulated sidecars and the counters they share."""

    sims: list[Sim]
    pacing: Pacing = field(default_factory=Pacing)
    rand: random.Random = field(default_factory=lambda: random.Random(7))
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    by_phase: dict[str, collections.Counter[str]] = field(
        default_factory=lambda: collections.defaultdict(collections.Counter)
    )
    restarting: bool = False
    # long polls first (the baseline, in the same run), then streams as the sidecar makes them
    stream: bool = False
    holding: collections.Counter[int] = field(default_factory=collections.Counter)  # version
    renewed: int = 0
    enrolled: int = 0
    phase: str = "enrollment"
    _moved: trio.Event = field(default_factory=trio.Event)

    def moved(self) -> None:
        """A simulated sidecar saw something new: wake `wait_until`."""
        self._moved.set()
        self._moved = trio.Event()

    async def wait_until(self, done: Any) -> None:
        """Wait until `done()` holds (the caller bounds the time)."""
        while not done():
            await self._moved.wait()

    def failed(self, exc: Exception) -> None:
        reason = exc.reason if isinstance(exc, ControlPlaneError) else type(exc).__name__
        self.errors[reason] += 1
        self.by_phase[self.phase][reason] += 1


async def enroll(sim: Sim, fleet: Fleet, limit: trio.CapacityLimiter) -> None:
    """Enroll with the join token; retry with the sidecar's backoff, a bounded number of times."""
    for failures in range(1, MAX_POLLS):
        async with limit:
            key = generate_key()
            csr = build_csr(key, sim.identity).decode()
            try:
                doc = await sim.client.request(
                    "POST",
                    ENROLL,
                    EnrollRequest(sim.token, csr).to_json(),
                    bundle_pem=sim.bundle,
                    now=datetime.now(UTC),
                )
                reply = SvidReply.parse(doc)
            except ControlPlaneError as exc:
                fleet.failed(exc)
                delay = fleet.pacing.schedule.retry_delay(failures, 0.0, fleet.rand.random())
            else:
                _install(sim, key, reply)
                return
        await trio.sleep(delay)
    fleet.errors["enroll_gave_up"] += 1  # the phase's deadline says the rest


def _install(sim: Sim, key: Any, reply: SvidReply) -> None:
    sim.held = HeldIdentity(key_to_pem(key) + reply.svid.encode())
    if reply.bundle is not None:
        sim.bundle = reply.bundle.encode()
    sim.bundle_sequence = reply.bundle_sequence


async def enroll_and_watch(sim: Sim, fleet: Fleet, limit: trio.CapacityLimiter) -> None:
    await enroll(sim, fleet, limit)
    fleet.enrolled += 1
    fleet.moved()
    await watch(sim, fleet)


async def renew(sim: Sim, fleet: Fleet) -> None:
    """Renew with a fresh key, retrying with the sidecar's backoff until it succeeds."""
    failures = 0
    while sim.polls < MAX_POLLS:
        sim.polls += 1
        key = generate_key()
        csr = build_csr(key, sim.identity).decode()
        assert sim.held is not None
        try:
            doc = await sim.client.request(
                "POST",
                RENEW,
                RenewRequest(csr, sim.bundle_sequence).to_json(),
                bundle_pem=sim.bundle,
                now=datetime.now(UTC),
                identity=sim.held,
            )
            reply = SvidReply.parse(doc)
        except ControlPlaneError as exc:
            fleet.failed(exc)
            failures += 1
            await trio.sleep(fleet.pacing.schedule.retry_delay(failures, 0.0, fleet.rand.random()))
            continue
        _install(sim, key, reply)
        sim.renew_due = False
        sim.renewed_at = time.monotonic()
        fleet.renewed += 1
        fleet.moved()
        return


async def watch(sim: Sim, fleet: Fleet) -> None:
    """Keep one watch streaming, as `sidecar.feed.FeedFollower.watch` does."""
    failures = 0

    async def take(doc: dict[str, Any]) -> None:
        feed = Feed.parse(doc)
        if feed.delta is not None:
            assert sim.feed is not None  # a delta comes only to a watch that asked for one
            feed = feed.applied_to(sim.feed)
        sim.feed = feed
        if feed.policy_version not in sim.seen:
            sim.seen[feed.policy_version] = time.monotonic()
            fleet.holding[feed.policy_version] += 1
            fleet.moved()
        sim.versions = (feed.policy_version, feed.revocation_version, feed.bundle_sequence)

    while sim.polls < MAX_POLLS:
        if sim.renew_due:
            await renew(sim, fleet)
        sim.polls += 1
        # deltas once a whole feed is held, as the sidecar asks (`FeedFollower._watch_query`)
        delta = sim.feed is not None and sim.feed.policy_version == sim.versions[0]
        query = WatchQuery(*sim.versions, wait=WATCH_WAIT, delta=delta, stream=fleet.stream)
        try:
            await sim.client.request(
                "GET",
                query.target(),
                None,
                bundle_pem=sim.bundle,
                now=datetime.now(UTC),
                identity=sim.held,
                wait=WATCH_WAIT + 10 + GATE_ALLOWANCE,
                each=take,
            )
        except Exception as exc:  # one failed watch: back off as the sidecar does
            if isinstance(exc, DeltaMismatch):
                sim.feed = None  # the whole list next time
            fleet.failed(exc)
            failures += 1
            if fleet.restarting and sim.renewed_at is None:  # once after the restart
                sim.renew_due = True
            delay = fleet.pacing.watch_retry(failures, fleet.rand.random())
            await trio.sleep(delay)
            continue
        failures = 0


async def metric(port: int, name: str) -> float | None:
    """One sample of the authority's Prometheus metric `name` (None if unreachable)."""
    with trio.move_on_after(5):
        try:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
        except OSError:
            return None
        async with stream:
            await stream.send_all(b"GET /metrics HTTP/1.0\r\nhost: bench\r\n\r\n")
            body = b""
            for _ in range(10_000):
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                body += chunk
        match = re.search(rb"^" + name.encode() + rb" ([0-9.e+]+)$", body, re.MULTILINE)
        return float(match.group(1)) if match else None
    return None


async def parked_watches(ports: list[int]) -> float:
    """Watches parked on the authority: the sum over its workers (one metrics port each)."""
    return sum([await metric(port, "meshid_ca_watches") or 0 for port in ports])


async def wait_parked(ports: list[int], n: int, limit_s: float, fleet: Fleet, log: Any) -> float:
    """Wait until the authority holds `n` watches parked; how long that took."""
    started = time.monotonic()
    said = started
    with trio.fail_after(limit_s):
        # another process's gauge: nothing to wait on but the next sample
        while (parked := await parked_watches(ports)) < n:
            if time.monotonic() - said > 10:
                said = time.monotonic()
                log(f"{parked:.0f} of {n} parked; client errors {dict(fleet.errors)}")
            await trio.sleep(0.2)
    return time.monotonic() - started


class GcTime:
    """Seconds this process spent in the cyclic garbage collector (a `gc.callbacks` entry)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.full = 0  # collections of the oldest generation
        self._began = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._began = time.perf_counter()
            return
        self.seconds += time.perf_counter() - self._began
        self.full += info["generation"] == 2


def _self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def family(pid: int) -> list[int]:
    """`pid` and its children (`ca serve --workers N` forks N workers and waits)."""
    children: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):  # gone meanwhile
            stat = (entry / "stat").read_text(encoding="ascii", errors="replace")
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:  # field 4: the parent
                children.append(int(entry.name))
    return [pid, *children]


def family_cpu_seconds(pid: int) -> float:
    """CPU seconds of the authority: the serving process and its workers, if any."""
    return sum(cpu_seconds(p) for p in family(pid))


def family_rss_kib(pid: int) -> int:
    """RSS of the authority and its workers, summed (pages they share counted in each)."""
    return sum(rss_kib(p) for p in family(pid))


def free_port_run(count: int) -> int:
    """The first of `count` consecutive free ports on 127.0.0.1 (worker i takes PORT+i)."""
    for _ in range(100):
        base = free_ports(1)[0]
        if base + count > 65536:
            continue
        socks: list[socket.socket] = []
        try:
            for port in range(base, base + count):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {count} consecutive free ports on 127.0.0.1")


def percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    if not ordered:
        return {"p50": float("nan"), "p99": float("nan"), "max": float("nan")}

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"p50": round(at(0.50), 3), "p99": round(at(0.99), 3), "max": round(ordered[-1], 3)}


@dataclass
class Run:
    """One size: the authority, the fleet, and the numbers."""

    n: int
    workdir: Path
    sup: Supervisor
    slack: float = 1.0  # a loaded machine needs longer deadlines (--slack)
    workers: int = 1  # `ca serve --workers`: processes sharing the port (SO_REUSEPORT)
    port: int = 0
    metrics_port: int = 0
    server: Proc | None = None
    result: dict[str, Any] = field(default_factory=dict)
    ends: float = math.inf  # monotonic: past it, every phase gives up (--budget)

    @property
    def metrics_ports(self) -> list[int]:
        """With --workers N, worker i serves its metrics on PORT+i."""
        return [self.metrics_port + i for i in range(self.workers)]

    def limit(self, seconds: float) -> float:
        """A phase's deadline, scaled by `--slack` and cut to what the run's budget leaves."""
        return max(0.0, min(seconds * self.slack, self.ends - time.monotonic()))

    @property
    def state(self) -> Path:
        return self.workdir / "ca"

    def start_server(self) -> Proc:
        server = self.sup.start(
            "ca-serve",
            [
                MESHID,
                "ca",
                "serve",
                "--state",
                str(self.state),
                "--listen",
                f"127.0.0.1:{self.port}",
                "--metrics",
                f"127.0.0.1:{self.metrics_port}",
                *(["--workers", str(self.workers)] if self.workers > 1 else []),
            ],
        )
        wait_listening([server], [self.port, self.metrics_port], timeout=60)
        self.server = server
        return server

    def prepare(self) -> list[Sim]:
        subprocess.run(
            [MESHID, "ca", "init", "--state", str(self.state), "--trust-domain", TD.name],
            check=True,
            capture_output=True,
        )
        ids = [SpiffeId(TD, f"/fanout/sidecar-{i}") for i in range(self.n)]
        authority = Authority.open(self.state, clock=system_clock())
        try:
            ring = [(str(ids[i]), str(ids[(i + 1) % self.n])) for i in range(self.n)]
            authority.apply_policy(ring)
            # long enough for the slowest rollout this bench waits for
            tokens = [authority.create_token(sid, ttl=timedelta(hours=3)) for sid in ids]
            bundle = authority.bundle().to_pem()
        finally:
            authority.close()
        self.port = free_ports(1)[0]
        self.metrics_port = free_port_run(self.workers)
        gate = trio.CapacityLimiter(HANDSHAKES)
        return [
            Sim(
                i,
                sid,
                token,
                SourcedClient("127.0.0.1", self.port, source_address(i), gate),
                None,
                bundle,
            )
            for i, (sid, token) in enumerate(zip(ids, tokens, strict=True))
        ]

    async def deny_one(self, round_: int) -> int:
        """`meshid policy deny` one ring pair; the new policy version it printed."""
        src = SpiffeId(TD, f"/fanout/sidecar-{round_}")
        dst = SpiffeId(TD, f"/fanout/sidecar-{(round_ + 1) % self.n}")
        done = await trio.run_process(
            [MESHID, "policy", "deny", "--state", str(self.state), str(src), str(dst)],
            capture_stdout=True,
            capture_stderr=True,
        )
        match = re.search(rb"policy version (\d+)", done.stdout)
        assert match, done.stdout
        return int(match.group(1))


async def measure(run: Run, sims: list[Sim], rounds: int, log: Any) -> None:
    fleet = Fleet(sims)
    n = run.n
    result = run.result
    server = run.start_server()
    result["workers"] = run.workers
    result["rss_idle_mib"] = round(family_rss_kib(server.pid) / 1024, 1)
    async with trio.open_nursery() as nursery:
        try:
            await phases(run, sims, fleet, rounds, nursery, log, server)
        except trio.TooSlowError:
            # What a fleet this size does to this authority on this machine: a finding too.
            result["incomplete"] = f"{fleet.phase} did not finish within its deadline"
            log(f"N={n}: {result['incomplete']}; client errors {dict(fleet.errors)}")
        nursery.cancel_scope.cancel()
    result["client_errors"] = dict(fleet.errors)
    result["client_errors_by_phase"] = {k: dict(v) for k, v in fleet.by_phase.items()}


async def phases(
    run: Run,
    sims: list[Sim],
    fleet: Fleet,
    rounds: int,
    nursery: trio.Nursery,
    log: Any,
    server: Proc,
) -> None:
    """Roll out, park, propagate `rounds` changes, restart; each phase with a deadline."""
    n = run.n
    result = run.result
    # A fleet rolling out: each enrolls, then watches at once, as a sidecar does.
    started = time.monotonic()
    limit = trio.CapacityLimiter(ENROLL_CONCURRENCY)
    for sim in sims:
        nursery.start_soon(enroll_and_watch, sim, fleet, limit)
    with trio.fail_after(run.limit(60 + n * 0.05)):
        await fleet.wait_until(lambda: fleet.enrolled >= n)
    result["enroll_all_s"] = round(time.monotonic() - started, 2)
    log(f"N={n}: enrolled in {result['enroll_all_s']}s")
    fleet.phase = "parking"
    result["park_all_s"] = round(
        await wait_parked(run.metrics_ports, n, run.limit(60 + n * 0.05), fleet, log), 2
    )
    rss = family_rss_kib(server.pid) / 1024
    result["rss_connected_mib"] = round(rss, 1)
    result["rss_per_sidecar_kib"] = round((rss - result["rss_idle_mib"]) * 1024 / n, 1)
    log(f"N={n}: parked; RSS {rss:.0f} MiB")

    # The same changes to the same fleet, answered to long polls (the baseline: how the
    # sidecar watched before streams), then to streams; one change between the two
    # moves every sidecar over (each long poll answers it and the next watch streams).
    fleet.phase = "propagation"
    polled = await propagate(run, sims, fleet, range(rounds), log, server)
    fleet.stream = True
    switch = await run.deny_one(rounds)
    with trio.fail_after(run.limit(60 + n * 0.03)):
        await fleet.wait_until(lambda: fleet.holding[switch] >= n)
    await wait_parked(run.metrics_ports, n, run.limit(60 + n * 0.05), fleet, log)
    streamed = await propagate(run, sims, fleet, range(rounds + 1, 2 * rounds + 1), log, server)
    result.update(streamed)
    result["long_poll"] = polled
    result["rss_after_rounds_mib"] = round(family_rss_kib(server.pid) / 1024, 1)

    # Restart: SIGTERM, start again; every sidecar renews and parks again.
    fleet.phase = "restart"
    fleet.restarting = True
    stopped = time.monotonic()
    run.sup.stop(server, grace=30)
    run.start_server()
    up = time.monotonic()
    with trio.fail_after(run.limit(120 + n * 0.05)):
        await fleet.wait_until(lambda: fleet.renewed >= n)
    renewed = [s.renewed_at - up for s in sims if s.renewed_at is not None]
    result["restart"] = {
        "down_s": round(up - stopped, 2),
        "renew_s": percentiles(renewed),
        "parked_again_s": round(
            time.monotonic()
            - up
            + await wait_parked(run.metrics_ports, n, run.limit(120 + n * 0.05), fleet, log),
            2,
        ),
        # the restarted authority after N renewals and N new connections: the churn's mark
        "rss_parked_again_mib": (
            round(family_rss_kib(run.server.pid) / 1024, 1) if run.server else None
        ),
    }
    log(f"N={n}: restart {result['restart']}")


async def propagate(
    run: Run, sims: list[Sim], fleet: Fleet, changes: range, log: Any, server: Proc
) -> dict[str, Any]:
    """`meshid policy deny` once per round (ring pair `i` for each i in `changes`), each
    timed from the command returning to every sidecar holding its version."""
    n = run.n
    mode = "streams" if fleet.stream else "long polls"
    latencies: list[float] = []
    rounds_out = []
    for round_ in changes:
        cpu, own = family_cpu_seconds(server.pid), _self_cpu()
        version = await run.deny_one(round_)
        returned = time.monotonic()
        with trio.fail_after(run.limit(60 + n * 0.03)):
            await fleet.wait_until(lambda v=version: fleet.holding[v] >= n)
        mine = [max(0.0, s.seen[version] - returned) for s in sims]
        latencies += mine
        # CPU the authority spent telling everyone: less at the mercy of the machine's load
        spent = family_cpu_seconds(server.pid) - cpu
        rounds_out.append(
            {
                **percentiles(mine),
                "server_cpu_s": round(spent, 2),
                "client_cpu_s": round(_self_cpu() - own, 2),
            }
        )
        log(f"N={n}: {mode}, change {len(rounds_out)} propagation {rounds_out[-1]}")
        await wait_parked(run.metrics_ports, n, run.limit(60 + n * 0.05), fleet, log)
    return {
        "propagation_s": percentiles(latencies),
        "server_cpu_per_change_s": min(r["server_cpu_s"] for r in rounds_out),
        "propagation_rounds": rounds_out,
    }


def server_refusals(log_path: Path) -> dict[str, int]:
    """Refusals and failures the authority logged, by reason."""
    counts: collections.Counter[str] = collections.Counter()
    with contextlib.suppress(OSError), log_path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "reason" in record:
                counts[f"{record.get('event')}:{record['reason']}"] += 1
    return dict(counts)


def run_size(
    n: int,
    rounds: int,
    keep: Path | None,
    log: Any,
    budget: float,
    slack: float,
    workers: int = 1,
) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix=f"meshid-fanout-{n}-", dir=keep))
    try:
        with Supervisor(workdir) as sup:
            run = Run(n, workdir, sup, slack, workers, ends=time.monotonic() + budget)
            started = time.monotonic()
            sims = run.prepare()
            run.result["setup_s"] = round(time.monotonic() - started, 1)
            log(f"N={n}: {n} tokens and ring policy in {run.result['setup_s']}s")
            # What was made so far lives to the end: out of the collector's sight.
            gc.collect()
            gc.freeze()
            young = gc.get_threshold()
            gc.set_threshold(GC_YOUNG, *young[1:])
            spent = GcTime()
            gc.callbacks.append(spent)
            try:
                trio.run(measure, run, sims, rounds, log)
            finally:
                gc.callbacks.remove(spent)
                gc.set_threshold(*young)
                gc.unfreeze()
            run.result["client_gc"] = {"seconds": round(spent.seconds, 1), "full": spent.full}
        run.result["server_refusals"] = server_refusals(workdir / "ca-serve.log")
        run.result["n"] = n
        run.result["when"] = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        run.result["loadavg"] = Path("/proc/loadavg").read_text().split()[:3]
        return run.result
    finally:
        if keep is None:
            shutil.rmtree(workdir, ignore_errors=True)


# -- the report --


def render(results: dict[str, dict[str, Any]]) -> str:
    """The RESULTS.md section: a table per size, the targets, the commands."""
    lines = [
        MARKER,
        "## Control-plane fan-out (`python -m bench.fanout`)",
        "",
        "One `meshid ca serve` and N simulated sidecars (one trio process, each sidecar on its "
        "own loopback address, the sidecar's own client, wire and backoff code), each holding "
        "one streamed watch and taking deltas, as the sidecar does. Targets at N = 10,000: "
        "propagation p99 <= 2 s, authority RSS <= 1 GiB.",
        "",
        "| N | authority RSS idle / connected (MiB) | RSS per sidecar (KiB) "
        "| deny -> all N: p50 / p99 / max (s) | authority CPU per change (s) "
        "| the same run, long polls: p99 (s) / CPU (s) "
        "| restart: renewed p50 / max (s) | all parked again (s) | client errors | measured |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for key in sorted(results, key=int):
        r = results[key]
        p, rs = r.get("propagation_s"), r.get("restart")
        errors = ", ".join(f"{k} {v}" for k, v in sorted(r["client_errors"].items())) or "none"
        renewed = (
            f"{_num(rs['renew_s']['p50'], 1)} / {_num(rs['renew_s']['max'], 1)}" if rs else "—"
        )
        polled = r.get("long_poll")
        baseline = (
            f"{_num(polled['propagation_s']['p99'], 2)} / "
            f"{_num(polled['server_cpu_per_change_s'], 2)}"
            if polled
            else "—"
        )
        lines.append(
            f"| {int(key):,} "
            f"| {_num(r.get('rss_idle_mib'))} / {_num(r.get('rss_connected_mib'))} "
            f"| {_num(r.get('rss_per_sidecar_kib'))} "
            f"| {_spread(p, 2) if p else '—'} | {_num(r.get('server_cpu_per_change_s'), 2)} "
            f"| {baseline} | {renewed} "
            f"| {_num(rs['parked_again_s'], 1) if rs else '—'} | {errors} "
            f"| {r['when']}, load {' '.join(r['loadavg'])}"
            f"{'; ' + r['incomplete'] if 'incomplete' in r else ''} |"
        )
    notes = [f"- N = {int(k):,}: {results[k]['note']}" for k in results if "note" in results[k]]
    if notes:
        lines += ["", "Seen while it ran (samples taken by hand, kept in `fanout.json`):", *notes]
    lines += [
        "",
        "![Fan-out cost as the mesh grows](fanout.png)",
        "",
        "Propagation is counted from `meshid policy deny` returning (0: every sidecar held the "
        "new version before the command had exited). What a change costs the authority: "
        "the poller sees the new version within 0.1 s and "
        "wakes every watch; their feeds are read in batches of 256 per trip to the "
        "database thread, from an index of the allow-list built once per version, and each "
        "caller's certificate chain is checked once and remembered (its validity times every "
        "time); each feed goes out as the next line of the watch's stream, so a change costs "
        "no request: answered as a long poll, every sidecar asked again after each change, "
        "and reading, checking and parking those N requests cost the authority as much as "
        "the feeds, and the generator as much again (the long-poll column: the same fleet, "
        "long-polling for the first changes of the same run). "
        "The sidecar keeps its connection to the authority alive between requests, "
        "so the watch it makes every 25 s costs no TLS handshake (it asks "
        "whether the authority closed a kept connection with poll(): select() took every "
        "descriptor past 1,023 for closed, and above 1,000 sidecars each watch paid a new "
        "handshake); a restart costs N handshakes (2 N here: each simulated sidecar also "
        "renews, then watches with its new SVID), "
        "spread over 2 s by the watch's fully jittered first retry. "
        "The fleet rolls out at most 64 enrollments at once, and the generator runs at most "
        "32 TLS handshakes at once, its sidecars' 3 s connect timeout starting when one is "
        "free: one process for N sidecars would otherwise interleave thousands of handshakes "
        "until every one overran that timeout (the authority then logged them as `tls_error`). "
        "Both processes collect the young generation of Python's garbage collector every "
        "50,000 allocations and freeze what they made at start: at 10,000 the collector had "
        "taken half of the generator's CPU and a fifth of the authority's (`client_gc` in "
        "`fanout.json` is the generator's time in it). "
        "The authority's admission caps (`ca serve --limit NAME=N`) are left at "
        "their defaults here: a simulated sidecar keeps one connection (a real one about "
        "two, so 10,000 real sidecars need `max_authenticated` above 20,000); each simulated "
        "sidecar has its own source address, as each pod "
        "has, so the per-source cap is not what is measured.",
        "",
        "Commands: `make bench` (N = 100 and 1,000), or "
        "`.venv/bin/python -m bench.fanout --sizes 100,1000`; N = 10,000: "
        "`make bench FANOUT_SIZES=10000` or `.venv/bin/python -m bench.fanout --sizes 10000`. "
        "Raw numbers, with the authority's logged refusals by reason: `bench/fanout.json`.",
        "",
    ]
    return "\n".join(lines)


def _num(value: float | None, digits: int = 0) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def _spread(p: dict[str, float], digits: int) -> str:
    return " / ".join(_num(p[k], digits) for k in ("p50", "p99", "max"))


def write_section(results_md: Path, section: str) -> None:
    """Replace the fan-out section of RESULTS.md (everything from the marker on), or append it."""
    text = results_md.read_text() if results_md.exists() else ""
    head = text.split(MARKER, 1)[0].rstrip("\n")
    results_md.write_text((head + "\n\n" if head else "") + section)


def plot(results: dict[str, dict[str, Any]], path: Path) -> bool:
    """Draw cost against N; False when matplotlib is not installed (the `bench` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    sizes = sorted(int(k) for k in results)
    rows = [results[str(n)] for n in sizes]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    done = [(n, r) for n, r in zip(sizes, rows, strict=True) if "propagation_s" in r]
    for key, style in (("p50", "o-"), ("p99", "o-"), ("max", "o--")):
        left.plot(
            [n for n, _ in done], [r["propagation_s"][key] for _, r in done], style, label=key
        )
    left.plot(
        [n for n, _ in done],
        [r["server_cpu_per_change_s"] for _, r in done],
        "s:",
        label="authority CPU",
    )
    polled = [(n, r["long_poll"]) for n, r in done if "long_poll" in r]
    left.plot(
        [n for n, _ in polled],
        [p["propagation_s"]["p99"] for _, p in polled],
        "x--",
        label="p99, long polls (same run)",
    )
    left.axhline(2.0, color="grey", linestyle=":", label="target p99 (N=10,000)")
    left.set(xscale="log", xlabel="sidecars (N)", ylabel="seconds", title="deny -> all N hold it")
    left.legend()
    parked = [(n, r) for n, r in zip(sizes, rows, strict=True) if "rss_connected_mib" in r]
    right.plot(
        [n for n, _ in parked],
        [r["rss_connected_mib"] for _, r in parked],
        "o-",
        label="RSS, N connected",
    )
    right.plot(sizes, [r["rss_idle_mib"] for r in rows], "o--", label="RSS, idle")
    right.axhline(1024, color="grey", linestyle=":", label="target (N=10,000)")
    right.set(xscale="log", xlabel="sidecars (N)", ylabel="MiB", title="authority memory")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fanout", description=__doc__)
    parser.add_argument(
        "--sizes",
        default="100,1000",
        help="comma-separated N (default 100,1000); empty: only redraw the report from --results",
    )
    parser.add_argument("--rounds", type=int, default=3, help="policy changes per size")
    parser.add_argument(
        "--budget", type=float, default=3600.0, help="seconds one size may take, at most"
    )
    parser.add_argument(
        "--slack", type=float, default=1.0, help="multiply every phase's deadline (busy machine)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="`ca serve --workers`: authority processes sharing the port (default 1)",
    )
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--out", type=Path, default=Path("bench/RESULTS.md"))
    parser.add_argument("--workdir", type=Path, help="keep the state and logs here")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]

    def log(msg: str) -> None:
        print(f"[fanout {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    most = max(sizes, default=0)  # none: draw the section and the plot from --results only
    nofile = raise_nofile(min(65536, 2 * most + 1024))
    if nofile < most + 256:
        log(f"RLIMIT_NOFILE is {nofile}: too low for N={most}")
        return 1
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any]] = {}
    if args.results.exists():
        results = json.loads(args.results.read_text())
    for n in sizes:
        results[str(n)] = run_size(
            n, args.rounds, args.workdir, log, args.budget, args.slack, args.workers
        )
        args.results.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
        log(f"N={n}: {json.dumps(results[str(n)])}")
    write_section(args.out, render(results))
    if not plot(results, args.results.with_suffix(".png")):
        log("matplotlib not installed (pip install -e '.[bench]'): no plot")
    print(render(results))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    sys.exit(130)
