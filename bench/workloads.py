"""The workloads: each one measures a few figures on a running chain, once per call.

A `Workload` names its figures (with their targets), the topologies it runs
on, and the exact load-generator command; `measure` runs one repetition and
returns a `Sample`: the figures, plus `details` (CPU seconds per process, CPU
cost per unit, load-generator CPU use) that explain them. The orchestrator
(`bench.run`) repeats, takes medians and profiles; workloads never start or
stop the system under test themselves.

Adding a workload (for instance the authority's signing throughput: SVIDs
issued per second over the API with concurrent clients) is a subclass here,
appended to `WORKLOADS`, with ``topologies = ("ca",)`` and a ``"ca"`` entry
in `bench.topology.TOPOLOGIES` that starts ``meshid ca serve``.
"""

from __future__ import annotations

import json
import re
import ssl
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace

import trio

from bench.procs import BenchError, Proc, cpu_window, run_measured, thread_count
from bench.topology import Chain, Env


@dataclass(frozen=True)
class Target:
    """`vs_stunnel`: meshid / stunnel >= value; `max`: meshid <= value; `min`: >= value."""

    kind: str
    value: float
    text: str


@dataclass(frozen=True)
class Figure:
    key: str
    title: str
    unit: str
    higher_is_better: bool = True
    target: Target | None = None
    digits: int = 0


@dataclass
class Sample:
    values: dict[str, float]
    details: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


class Workload(ABC):
    name: str
    title: str
    figures: tuple[Figure, ...]
    topologies: tuple[str, ...] = ("direct", "meshid", "stunnel")
    fresh_per_rep = False  # restart the chain before every repetition
    profile_seconds = 0.0  # how long the profiled extra run loads the chain (0: one measure)
    # (measured, baseline): figures reported as this pair and their ratio, not against stunnel
    compare: tuple[str, str] | None = None

    def unavailable(self) -> str | None:
        """Why this machine cannot run the workload (one line), or None when it can."""
        return None

    @abstractmethod
    def commands(self, chain: Chain) -> list[str]:
        """The load-generator commands, as run, for the report."""

    def warmup(self, chain: Chain, env: Env) -> None:  # noqa: B027 - optional hook
        """Run once on a fresh chain before the measured repetitions."""

    @abstractmethod
    def measure(self, chain: Chain, env: Env) -> Sample:
        """One repetition."""


def _watched(chain: Chain, env: Env) -> list[Proc]:
    """Processes whose CPU time explains a figure: the proxies and the backends."""
    backends = env.backend_procs if chain.own_backends is None else chain.own_backends
    return [*chain.procs.values(), *backends.values()]


def _cpu_details(cpu: dict[str, float], wall: float, per: float, unit: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, secs in cpu.items():
        out[f"{name}: CPU % of one core"] = 100 * secs / wall if wall > 0 else 0.0
        if per > 0:
            out[f"{name}: {unit}"] = secs / per * UNIT_SCALE[unit]
    return out


UNIT_SCALE = {"CPU s per GiB": 1.0, "CPU µs per request": 1e6, "CPU ms per connection": 1e3}

# -- bulk throughput ------------------------------------------------------------


class Bulk(Workload):
    name = "bulk"
    title = "Bulk throughput, one TCP stream each way (iperf3, 1 GiB per run)"
    figures = (
        Figure(
            "up",
            "bulk client→server",
            "MiB/s",
            target=Target("vs_stunnel", 1.0, "≥ 1.0x stunnel"),
        ),
        Figure(
            "down",
            "bulk server→client (iperf3 -R)",
            "MiB/s",
            target=Target("vs_stunnel", 1.0, "≥ 1.0x stunnel"),
        ),
    )
    size = "1G"

    def _argv(self, chain: Chain, reverse: bool) -> list[str]:
        argv = ["iperf3", "-c", "127.0.0.1", "-p", str(chain.ports["iperf"]), "-n", self.size, "-J"]
        return [*argv, "-R"] if reverse else argv

    def commands(self, chain: Chain) -> list[str]:
        return [" ".join(self._argv(chain, False)), " ".join(self._argv(chain, True))]

    def warmup(self, chain: Chain, env: Env) -> None:
        run_measured(
            ["iperf3", "-c", "127.0.0.1", "-p", str(chain.ports["iperf"]), "-n", "64M"], 60
        )

    def measure(self, chain: Chain, env: Env) -> Sample:
        sample = Sample({})
        for key, reverse in (("up", False), ("down", True)):
            with cpu_window(_watched(chain, env)) as cpu:
                done = run_measured(self._argv(chain, reverse), timeout=180)
            try:
                report = json.loads(done.output[done.output.index("{") :])
                received = report["end"]["sum_received"]
                util = report["end"]["cpu_utilization_percent"]
            except (ValueError, KeyError) as exc:
                raise BenchError(f"iperf3 failed: {done.output[-1500:]}") from exc
            nbytes, secs = float(received["bytes"]), float(received["seconds"])
            sample.values[key] = nbytes / secs / 2**20
            d = sample.details
            d[f"{key}: bytes received"] = nbytes
            d[f"{key}: iperf3 client CPU % (host_total)"] = float(util["host_total"])
            d[f"{key}: iperf3 server CPU % (remote_total)"] = float(util["remote_total"])
            for k, v in _cpu_details(cpu, secs, nbytes / 2**30, "CPU s per GiB").items():
                d[f"{key}: {k}"] = v
        return sample


# -- wrk-driven HTTP workloads ----------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        raise BenchError(f"cannot parse wrk latency {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


@dataclass(frozen=True)
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int
    non2xx: int
    wall: float
    cpu: float


def parse_wrk(output: str, wall: float, cpu: float) -> WrkResult:
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    p50 = re.search(r"^\s+50%\s+(\S+)", output, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", output, re.M)
    total = re.search(r"(\d+) requests in", output)
    if not (rps and p50 and p99 and total):
        raise BenchError(f"wrk output not understood:\n{output[-1500:]}")
    errors = 0
    sock = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    if sock:
        errors = sum(int(g) for g in sock.groups())
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    return WrkResult(
        rps=float(rps.group(1)),
        p50_ms=_ms(p50.group(1)),
        p99_ms=_ms(p99.group(1)),
        requests=int(total.group(1)),
        errors=errors,
        non2xx=int(non2xx.group(1)) if non2xx else 0,
        wall=wall,
        cpu=cpu,
    )


class _Wrk(Workload):
    connections = 50
    duration = 6
    extra: tuple[str, ...] = ()
    unit_cost = "CPU µs per request"

    def _argv(self, chain: Chain, duration: int) -> list[str]:
        return [
            *chain.client,
            "wrk",
            "-t1",
            f"-c{self.connections}",
            f"-d{duration}s",
            "--latency",
            *self.extra,
            f"http://{chain.host}:{chain.ports['http']}/",
        ]

    def commands(self, chain: Chain) -> list[str]:
        return [" ".join(f"'{a}'" if " " in a else a for a in self._argv(chain, self.duration))]

    def warmup(self, chain: Chain, env: Env) -> None:
        run_measured(self._argv(chain, 1), timeout=60)

    def run_wrk(self, chain: Chain, env: Env) -> tuple[WrkResult, dict[str, float]]:
        with cpu_window(_watched(chain, env)) as cpu:
            done = run_measured(self._argv(chain, self.duration), timeout=self.duration + 60)
        result = parse_wrk(done.output, done.wall, done.cpu)
        details = {
            "wrk CPU % of its one thread": 100 * result.cpu / result.wall,
            "socket errors": float(result.errors),
            "non-2xx responses": float(result.non2xx),
        }
        details.update(_cpu_details(cpu, result.wall, float(result.requests), self.unit_cost))
        return result, details


class SmallRequests(_Wrk):
    name = "small"
    title = "Small request/response on 50 persistent connections (wrk → nginx `return 200`)"
    figures = (
        Figure("rps", "small req/s", "req/s", target=Target("vs_stunnel", 1.0, "≥ 1.0x stunnel")),
        Figure("p50", "small p50 latency", "ms", higher_is_better=False, digits=3),
        Figure("p99", "small p99 latency", "ms", higher_is_better=False, digits=3),
    )

    def measure(self, chain: Chain, env: Env) -> Sample:
        r, details = self.run_wrk(chain, env)
        return Sample({"rps": r.rps, "p50": r.p50_ms, "p99": r.p99_ms}, details)


def _log_sizes(chain: Chain) -> dict[str, int]:
    return {name: path.stat().st_size for name, path in chain.event_logs.items() if path.exists()}


def resumed_shares(chain: Chain, since: dict[str, int]) -> dict[str, float]:
    """Per sidecar, the % of connections allowed since `since` whose TLS handshake resumed.

    Read from each sidecar's decision log (the `resumed` field of its allow
    lines), so that the figure shows resumption really happening.
    """
    out: dict[str, float] = {}
    for name, path in chain.event_logs.items():
        allowed = resumed = 0
        with path.open("rb") as f:
            f.seek(since.get(name, 0))
            for line in f:
                if b'"decision":"allow"' in line:
                    allowed += 1
                    resumed += b'"resumed":true' in line
        if allowed:
            out[f"{name}: % of connections resumed"] = 100 * resumed / allowed
    return out


class NewConnections(_Wrk):
    name = "newconn"
    title = "New connection per request (wrk, `Connection: close`; full mTLS between proxies)"
    connections = 32
    extra = ("-H", "Connection: close")
    unit_cost = "CPU ms per connection"
    figures = (
        Figure("cps", "new conns/s", "conn/s", target=Target("vs_stunnel", 1.0, "≥ 1.0x stunnel")),
        Figure("p50", "new-conn p50 latency", "ms", higher_is_better=False, digits=3),
        Figure("p99", "new-conn p99 latency", "ms", higher_is_better=False, digits=3),
    )

    def measure(self, chain: Chain, env: Env) -> Sample:
        since = _log_sizes(chain)
        r, details = self.run_wrk(chain, env)
        details.update(resumed_shares(chain, since))
        return Sample({"cps": r.rps, "p50": r.p50_ms, "p99": r.p99_ms}, details)


# -- transparent interception ---------------------------------------------------------


class _Transparent(Workload):
    """Mixed into a wrk workload: the captured path against the explicit one, same hosts."""

    topologies: tuple[str, ...] = ("explicit", "transparent")
    compare: tuple[str, str] | None = ("transparent", "explicit")

    def unavailable(self) -> str | None:
        from bench.netns import unavailable

        return unavailable()


def _untargeted(f: Figure) -> Figure:
    """The figure without its stunnel target: here the baseline is the explicit path."""
    return replace(f, target=None)


class TransparentSmall(_Transparent, SmallRequests):
    name = "transparent-small"
    title = (
        "Transparent interception, small requests on 50 persistent connections "
        "(wrk on web's host → nginx on api's, across network namespaces)"
    )
    figures = (
        _untargeted(SmallRequests.figures[0]),
        _untargeted(SmallRequests.figures[1]),
        _untargeted(SmallRequests.figures[2]),
    )


class TransparentNewConnections(_Transparent, NewConnections):
    name = "transparent-newconn"
    title = (
        "Transparent interception, a new TCP + mTLS connection per request "
        "(wrk `Connection: close`, across network namespaces)"
    )
    figures = (
        _untargeted(NewConnections.figures[0]),
        _untargeted(NewConnections.figures[1]),
        _untargeted(NewConnections.figures[2]),
    )


# -- idle connections -------------------------------------------------------------

REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"


async def _open_idle(port: int, n: int, into: list[trio.SocketStream], parallel: int) -> None:
    """Open n connections, each carrying one request and its response, and keep them open."""
    limiter = trio.CapacityLimiter(parallel)

    async def one() -> None:
        async with limiter:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            into.append(stream)
            await stream.send_all(REQUEST)
            buf = b""
            while not (b"\r\n\r\n" in buf and buf.endswith(b"ok\n")):
                data = await stream.receive_some(4096)
                if not data:
                    raise BenchError("connection closed before the response")
                buf += data

    async with trio.open_nursery() as nursery:
        for _ in range(n):
            nursery.start_soon(one)


async def _settle(procs: list[Proc], seconds: float = 1.0) -> None:
    """Wait until every proxy's RSS stops changing (bounded)."""
    last = [p.rss_kib() for p in procs]
    for _ in range(int(10 / seconds)):
        await trio.sleep(seconds)
        now = [p.rss_kib() for p in procs]
        if now == last:
            return
        last = now


class IdleMemory(Workload):
    name = "idle"
    title = "RSS per idle connection (each carried one request, then idles), per proxy process"
    topologies = ("meshid", "stunnel")
    fresh_per_rep = True
    counts = (1000, 5000)
    figures = tuple(
        Figure(
            f"{n}:{pos}",
            f"RSS/idle conn @{n}, {pos} proxy",
            "KiB",
            higher_is_better=False,
            target=Target("max", 50.0, "≤ 50 KiB per sidecar"),
            digits=1,
        )
        for n in (1000, 5000)
        for pos in ("front", "back")
    )

    def commands(self, chain: Chain) -> list[str]:
        return [
            f"python (bench.workloads.IdleMemory): open {' then '.join(map(str, self.counts))} "
            f"connections to 127.0.0.1:{chain.ports['http']} (32 at a time), one "
            "`GET /` each, keep them open; VmRSS of each proxy from /proc/PID/status"
        ]

    def measure(self, chain: Chain, env: Env) -> Sample:
        procs = list(chain.procs.values())  # front proxy first, then back
        return trio.run(self._measure, chain, procs)

    async def _measure(self, chain: Chain, procs: list[Proc]) -> Sample:
        port = chain.ports["http"]
        streams: list[trio.SocketStream] = []
        sample = Sample({})
        try:
            with trio.fail_after(240):
                # Warm up: contexts, pools and sessions exist before the baseline.
                await _open_idle(port, 64, streams, 32)
                for s in streams:
                    await s.aclose()
                streams.clear()
                await _settle(procs)
                base = [p.rss_kib() for p in procs]
                for p, b in zip(procs, base, strict=True):
                    sample.details[f"{p.name}: baseline RSS KiB"] = b
                started = time.monotonic()
                for n in self.counts:
                    await _open_idle(port, n - len(streams), streams, 32)
                    if n == self.counts[0]:
                        sample.details["seconds to open the first batch"] = (
                            time.monotonic() - started
                        )
                    await _settle(procs)
                    for pos, p, b in zip(("front", "back"), procs, base, strict=True):
                        sample.values[f"{n}:{pos}"] = (p.rss_kib() - b) / n
                        sample.details[f"{p.name}: threads @{n}"] = thread_count(p.pid)
                    for p in procs:
                        p.check_alive()
        finally:
            for s in streams:
                s.socket.close()
        return sample


class CaSigning(Workload):
    name = "ca"
    title = (
        "Control plane: SVIDs signed per second over the API (mTLS renewals, concurrent clients)"
    )
    # SQLite in the state directory (the embedded default), then PostgreSQL with one
    # instance and with two instances of the trust domain sharing the load
    topologies = ("ca", "ca-pg1", "ca-pg2")
    clients = 128  # enough connections for the kernel to spread them evenly over the workers
    requests = 8000
    figures = (
        Figure(
            "svids", "SVIDs issued per second", "SVID/s", target=Target("min", 1000, "≥ 1,000/s")
        ),
    )

    def __init__(self) -> None:
        self._contexts: dict[str, list[ssl.SSLContext]] = {}  # chain kind -> client contexts

    def commands(self, chain: Chain) -> list[str]:
        to = ", ".join(f"127.0.0.1:{p}" for p in chain.ports.values())
        spread = " (client i to the i mod n-th)" if len(chain.ports) > 1 else ""
        return [
            f"python (bench.ca_throughput): {self.clients} clients, each on one kept-alive mTLS "
            f"connection with its own SVID, 4 renewals pipelined, {self.requests} POST /v1/renew "
            f"in all, each with a CSR for a fresh key made before the clock starts, to {to}"
            + spread
        ]

    def warmup(self, chain: Chain, env: Env) -> None:
        from bench.ca_throughput import client_contexts

        assert chain.state is not None, "an authority chain names its state directory"
        keys = env.workdir / "ca-bench" / f"{chain.kind}-clients"
        keys.mkdir(parents=True, exist_ok=True)
        self._contexts[chain.kind] = client_contexts(chain.state, keys, self.clients)

    def measure(self, chain: Chain, env: Env) -> Sample:
        from bench.ca_throughput import run_once

        result = run_once(
            list(chain.ports.values()),
            self._contexts[chain.kind],
            self.requests,
            [proc.pid for proc in chain.procs.values()],
            [chain.database_pid] if chain.database_pid is not None else [],
        )
        if result.errors:
            raise BenchError(f"{result.errors} renewals failed")
        return Sample(
            {"svids": result.svids_per_s},
            {
                "authority: CPU ms per SVID (all workers)": 1000
                * result.server_cpu_s
                / max(result.requests, 1),
                "load generator: CPU ms per SVID": 1000
                * result.client_cpu_s
                / max(result.requests, 1),
                "authority: cores busy": result.server_cpu_s / result.wall_s,
                **(
                    {
                        "database: CPU ms per SVID": 1000
                        * result.database_cpu_s
                        / max(result.requests, 1)
                    }
                    if chain.database_pid is not None
                    else {}
                ),
            },
        )


WORKLOADS: list[Workload] = [
    Bulk(),
    SmallRequests(),
    NewConnections(),
    IdleMemory(),
    CaSigning(),
    TransparentSmall(),
    TransparentNewConnections(),
]
