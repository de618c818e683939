"""Whole-system harness: the real `meshid` CLI in subprocesses, on 127.0.0.1 only.

What it owns: starting `meshid ca serve` and `meshid sidecar run` as child
processes, reading their JSON-lines logs as they grow, and stopping them again
(by the pid we started, SIGTERM first, SIGKILL if they do not go). Plus the
plain test-side endpoints: an echo app behind the sidecars, a steady traffic
generator, and a probe TLS client holding an SVID of its own.

Theory of operation:

- Every listener binds port 0; the process reports what it got (`serving`
  from the control plane, `started` from a sidecar, both with the address),
  so no port is ever guessed. A restart rewrites the config with the ports
  the first run got, so peers keep reaching it at the same address.
- Waiting is always "wait until a condition holds, by a deadline": a log
  line appeared, /readyz answered 200, a connection was refused. Every loop
  is bounded in iterations and in time, and fails with the tail of the
  relevant log. `trio.sleep` appears only as the poll interval of such a
  loop or as the pacing of the traffic generator, never as synchronisation.
- Times measured for "within N seconds" claims are trio's monotonic clock in
  this process, from the moment a CLI command exited.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import signal
import ssl
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

import trio
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from meshid.svid import certs_from_pem, verify_svid

MESHID = Path(sys.executable).with_name("meshid")  # the installed console script
TD = "example.org"
HOST = "127.0.0.1"
POLL = 0.02  # seconds between two looks at a log file or an endpoint
Addr = tuple[str, int]


def sid(name: str) -> str:
    return f"spiffe://{TD}/{name}"


def fmt(addr: Addr) -> str:
    return f"{addr[0]}:{addr[1]}"


def parse_addr(text: str) -> Addr:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def utcnow() -> datetime:
    return datetime.now(UTC)


def now() -> float:
    return trio.current_time()


def signs_from(joined: str) -> datetime:
    """When the root of an instance `ca join` made may sign, from what join printed
    ("... signs from 2026-01-01T00:00:00Z once ..."), rounded up to the next second."""
    stamp = joined.split(" signs from ", 1)[1].split()[0]
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC) + timedelta(seconds=1)


# -- the CLI -------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    exited_at: float  # trio.current_time() when the command had exited

    def check(self) -> Result:
        assert self.returncode == 0, (
            f"{' '.join(self.argv)} exited {self.returncode}: {self.stderr}"
        )
        return self


async def meshid(*args: str | Path, within: float = 30.0) -> Result:
    """Run one `meshid` command to completion; never raises on a non-zero exit."""
    argv = (str(MESHID), *(str(a) for a in args))
    with trio.fail_after(within):
        done = await trio.run_process(
            argv, capture_stdout=True, capture_stderr=True, check=False, stdin=subprocess.DEVNULL
        )
    return Result(argv, done.returncode, done.stdout.decode(), done.stderr.decode(), now())


# -- logs ----------------------------------------------------------------------


class JsonLog:
    """A JSON-lines file another process appends to, read incrementally.

    Lines that are not JSON (a traceback, a one-line CLI error) are kept in
    `other` so a failing wait can show them.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: list[dict[str, Any]] = []
        self.other: list[str] = []
        self._offset = 0
        self._partial = b""

    def refresh(self) -> list[dict[str, Any]]:
        try:
            with self.path.open("rb") as handle:
                handle.seek(self._offset)
                data = handle.read()
        except FileNotFoundError:
            return self.records
        self._offset += len(data)
        *lines, self._partial = (self._partial + data).split(b"\n")
        for raw in lines:
            line = raw.decode("utf-8", "replace").strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except ValueError:
                self.other.append(line)
                continue
            if isinstance(record, dict):
                record["_seen"] = now()  # when this process first read it
                self.records.append(record)
            else:
                self.other.append(line)
        return self.records

    def mark(self) -> int:
        """An index to pass as `since`: only records read after this point count."""
        return len(self.refresh())

    def find(
        self,
        event: str | None = None,
        *,
        since: int = 0,
        where: Callable[[dict[str, Any]], bool] | None = None,
        **match: Any,
    ) -> list[dict[str, Any]]:
        return [
            r
            for r in self.refresh()[since:]
            if (event is None or r.get("event") == event)
            and all(r.get(k) == v for k, v in match.items())
            and (where is None or where(r))
        ]

    def tail(self, n: int = 15) -> str:
        lines = [json.dumps({k: v for k, v in r.items() if k != "_seen"}) for r in self.records]
        return "\n".join([*lines[-n:], *self.other[-5:]])

    async def wait_for(
        self,
        event: str | None = None,
        *,
        count: int = 1,
        since: int = 0,
        within: float = 20.0,
        where: Callable[[dict[str, Any]], bool] | None = None,
        **match: Any,
    ) -> list[dict[str, Any]]:
        """Wait until at least `count` records match; return all that do."""
        deadline = now() + within
        for _ in range(int(within / POLL) + 2):
            found = self.find(event, since=since, where=where, **match)
            if len(found) >= count:
                return found
            if now() >= deadline:
                break
            await trio.sleep(POLL)
        raise AssertionError(
            f"{self.path.name}: no {count} x {event} {match} within {within}s; tail:\n{self.tail()}"
        )


# -- processes -----------------------------------------------------------------


class Proc:
    """One child process we started; `stop` is the only way it is ended."""

    def __init__(self, name: str, process: trio.Process, output: IO[bytes]) -> None:
        self.name = name
        self.process = process
        self._output = output

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process.returncode is None

    async def stop(self, sig: int = signal.SIGTERM, within: float = 15.0) -> int:
        """Signal our child by its pid and wait for it; SIGKILL if it outlives `within`."""
        try:
            if self.process.returncode is None:
                self.process.send_signal(sig)
            with trio.move_on_after(within):
                await self.process.wait()
            if self.process.returncode is None:
                self.process.kill()
                with trio.move_on_after(10), trio.CancelScope(shield=True):
                    await self.process.wait()
        finally:
            if self.process.returncode is not None:
                self._output.close()
        return self.process.returncode if self.process.returncode is not None else -9


class Processes:
    """Every process a test started, so teardown can stop what is still running."""

    def __init__(self) -> None:
        self.started: list[Proc] = []

    async def spawn(self, name: str, argv: Sequence[str | Path], output: Path) -> Proc:
        handle = output.open("ab")
        try:
            process = await trio.lowlevel.open_process(
                [str(a) for a in argv],
                stdin=subprocess.DEVNULL,
                stdout=handle,
                stderr=handle,
            )
        except BaseException:
            handle.close()
            raise
        proc = Proc(name, process, handle)
        self.started.append(proc)
        return proc

    async def stop_all(self) -> None:
        with trio.CancelScope(shield=True):
            for proc in reversed(self.started):
                if proc.running:
                    await proc.stop(within=10.0)


# -- the authority -------------------------------------------------------------


class Authority:
    """`meshid ca …` and `meshid policy …` against one state directory."""

    def __init__(self, root: Path, procs: Processes, td: str = TD) -> None:
        self.root = root
        self.td = td
        self.state = root / "ca-state"
        self.procs = procs
        self.server: Proc | None = None
        self.addr: Addr | None = None
        self.bundle_endpoint = False  # serve the SPIFFE bundle endpoint too (port 0)
        self.bundle_url: str | None = None
        self.log: JsonLog | None = None
        self._runs = 0

    async def init(self, svid_ttl: str = "1h", *extra: str | Path) -> None:
        """`ca init`; `extra` adds options (`--database URL --instance NAME`)."""
        (
            await meshid(
                "ca",
                "init",
                "--state",
                self.state,
                "--trust-domain",
                self.td,
                "--svid-ttl",
                svid_ttl,
                *extra,
            )
        ).check()

    async def join(self, first: Authority, *database: str | Path) -> datetime:
        """`ca join` the trust domain `first` made in the database named by `database`
        (`--database URL --instance NAME ...`); returns when the new instance's root
        may sign (and `ca serve` start): after the shortest delay, as no sidecar runs
        yet to wait for."""
        joined = (
            await meshid(
                "ca",
                "join",
                "--state",
                self.state,
                *database,
                "--audit-key",
                first.state / "audit.key",
                "--propagation",
                "1s",
            )
        ).check()
        return signs_from(joined.stdout)

    async def serve(self) -> Proc:
        """Start the control plane (on the port of the previous run, if any); wait for it."""
        assert self.server is None or not self.server.running, "already serving"
        self._runs += 1
        port = self.addr[1] if self.addr else 0
        path = self.root / f"ca-serve-{self._runs}.log"
        self.log = JsonLog(path)
        extra = ["--bundle-endpoint", f"{HOST}:0"] if self.bundle_endpoint else []
        self.server = await self.procs.spawn(
            "ca",
            [MESHID, "ca", "serve", "--state", self.state, "--listen", f"{HOST}:{port}", *extra],
            path,
        )
        [serving] = await self.wait_serving()
        self.addr = parse_addr(serving["listen"])
        if self.bundle_endpoint:
            [endpoint] = await self.log.wait_for("bundle_endpoint_serving", within=20.0)
            host, bport = parse_addr(endpoint["listen"])
            self.bundle_url = f"https://{host}:{bport}/"
        return self.server

    async def wait_serving(self) -> list[dict[str, Any]]:
        assert self.log is not None and self.server is not None
        deadline = now() + 20.0
        for _ in range(int(20.0 / POLL) + 2):
            found = self.log.find("serving")
            if found:
                return found
            assert self.server.running, f"ca serve exited:\n{self.log.tail()}"
            if now() >= deadline:
                break
            await trio.sleep(POLL)
        raise AssertionError(f"ca serve never logged serving:\n{self.log.tail()}")

    async def stop(self) -> int:
        assert self.server is not None
        return await self.server.stop(signal.SIGTERM)

    def bundle_pem(self) -> bytes:
        return (self.state / "bundle.pem").read_bytes()

    def roots(self) -> list[x509.Certificate]:
        return certs_from_pem(self.bundle_pem(), "the authority's bundle")

    async def token(self, name: str) -> str:
        return (await meshid("ca", "token", "--state", self.state, name)).check().stdout.strip()

    async def allow(self, source: str, target: str) -> Result:
        return (await meshid("policy", "allow", source, target, "--state", self.state)).check()

    async def deny(self, source: str, target: str) -> Result:
        return (await meshid("policy", "deny", source, target, "--state", self.state)).check()

    async def check(self, source: str, target: str) -> Result:
        return await meshid("policy", "check", source, target, "--state", self.state)

    async def revoke(self, name: str) -> Result:
        return (await meshid("ca", "revoke", "--state", self.state, name)).check()

    async def rotate(self, propagation: str) -> Result:
        return (
            await meshid("ca", "rotate", "--state", self.state, "--propagation", propagation)
        ).check()

    async def issue(self, name: str, out: Path, ttl: str | None = None) -> Result:
        extra = ["--ttl", ttl] if ttl else []
        return (
            await meshid("ca", "issue", "--state", self.state, name, "--out", out, *extra)
        ).check()


# -- sidecars ------------------------------------------------------------------


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string is a JSON string for our values


def _servers(servers: Sequence[Addr]) -> str:
    """`authority.server`: one string for one server, as before lists existed; else a list."""
    if len(servers) == 1:
        return _toml(fmt(servers[0]))
    return "[" + ", ".join(_toml(fmt(s)) for s in servers) + "]"


class Sidecar:
    """`meshid sidecar run --config` in dynamic mode, with its own directory and log file."""

    def __init__(
        self,
        name: str,
        directory: Path,
        procs: Processes,
        *,
        servers: Sequence[Addr],
        forward: Addr | None,
        outbound: Sequence[tuple[str, Addr]],
        limits: dict[str, Any],
        td: str = TD,
    ) -> None:
        self.name = name
        self.td = td
        self.dir = directory
        self.procs = procs
        self.servers = list(servers)  # the authority's instances, in the order tried
        self.forward = forward
        self.outbound_routes = list(outbound)
        self.limits = limits
        self.config = directory / "sidecar.toml"
        self.log = JsonLog(directory / "events.jsonl")
        self.proc: Proc | None = None
        self.listeners: dict[str, Addr] = {}
        self._runs = 0

    def write_config(self) -> None:
        """The config, with the ports of the previous run once there was one (0 before)."""

        def listen(key: str) -> str:
            return fmt(self.listeners.get(key, (HOST, 0)))

        lines = [
            f"identity = {_toml(self.name)}",
            f"trust_domain = {_toml(self.td)}",
            "[authority]",
            f"server = {_servers(self.servers)}",
            'bundle = "bundle.pem"',
            'token_file = "join.token"',
            'state_dir = "state"',
        ]
        if self.forward is not None:
            lines += [
                "[inbound]",
                f"listen = {_toml(listen('inbound[0]'))}",
                f"forward = {_toml(fmt(self.forward))}",
            ]
        for i, (identity, upstream) in enumerate(self.outbound_routes):
            lines += [
                "[[outbound]]",
                f"listen = {_toml(listen(f'outbound[{i}]'))}",
                f"upstream = {_toml(fmt(upstream))}",
                f"identity = {_toml(identity)}",
            ]
        lines += ["[admin]", f"listen = {_toml(listen('admin'))}"]
        if self.limits:
            lines.append("[limits]")
            lines += [f"{k} = {_toml(v)}" for k, v in self.limits.items()]
        lines += ["[log]", 'file = "events.jsonl"']
        self.config.write_text("\n".join(lines) + "\n")

    async def start(self, within: float = 30.0) -> None:
        """Run the sidecar; return once it logged `started` and /readyz answers 200."""
        assert self.proc is None or not self.proc.running, f"{self.name} already running"
        self._runs += 1
        self.write_config()
        mark = self.log.mark()
        self.proc = await self.procs.spawn(
            self.name,
            [MESHID, "sidecar", "run", "--config", self.config],
            self.dir / f"stderr-{self._runs}.txt",
        )
        deadline = now() + within
        started: list[dict[str, Any]] = []
        for _ in range(int(within / POLL) + 2):
            started = self.log.find("started", since=mark)
            if started or not self.proc.running or now() >= deadline:
                break
            await trio.sleep(POLL)
        if not started:
            errors = (self.dir / f"stderr-{self._runs}.txt").read_text()
            raise AssertionError(f"{self.name} never started: {errors}\n{self.log.tail()}")
        self.listeners = {k: parse_addr(v) for k, v in started[0]["listeners"].items()}
        await self.wait_ready(max(1.0, deadline - now()))

    async def wait_ready(self, within: float) -> None:
        deadline = now() + within
        status = 0
        for _ in range(int(within / POLL) + 2):
            with contextlib.suppress(OSError):
                status, _ = await http_get(self.admin, "/readyz")
                if status == 200:
                    return
            if now() >= deadline:
                break
            await trio.sleep(POLL)
        raise AssertionError(f"{self.name}: /readyz never 200 (last {status})\n{self.log.tail()}")

    async def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        return await self.proc.stop(sig)

    @property
    def inbound(self) -> Addr:
        return self.listeners["inbound[0]"]

    def outbound(self, index: int = 0) -> Addr:
        return self.listeners[f"outbound[{index}]"]

    @property
    def admin(self) -> Addr:
        return self.listeners["admin"]

    async def svid(self) -> dict[str, Any]:
        status, body = await http_get(self.admin, "/svid")
        assert status == 200, body
        result: dict[str, Any] = json.loads(body)
        return result

    async def metric(self, name: str, **labels: str) -> float:
        """The sum of the samples of `name` whose labels include `labels` (0.0 if none)."""
        status, body = await http_get(self.admin, "/metrics")
        assert status == 200
        total = 0.0
        for family in text_string_to_metric_families(body.decode()):
            for sample in family.samples:
                if sample.name == name and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    total += float(sample.value)
        return total

    def serials(self, *how: str) -> list[str]:
        """The serials of the SVIDs this sidecar installed (enrolled, renewed, ...), in order."""
        return [r["serial"] for r in self.log.find("credentials") if not how or r["how"] in how]


class Mesh:
    """One authority, its sidecars and the processes behind them, under one directory."""

    def __init__(self, root: Path, procs: Processes, td: str = TD) -> None:
        self.root = root
        self.procs = procs
        self.td = td
        self.authority = Authority(root, procs, td)
        self.sidecars: dict[str, Sidecar] = {}
        self.servers = [self.authority]  # the instances a new sidecar names, in this order

    async def start_authority(self, svid_ttl: str = "1h") -> Authority:
        await self.authority.init(svid_ttl)
        await self.authority.serve()
        return self.authority

    async def start_instances(self, *database: str | Path, svid_ttl: str = "1h") -> list[Authority]:
        """Two instances of one trust domain in PostgreSQL (`database`: `--database URL`
        and any other option for it), `one` made by init, `two` joined, both serving;
        new sidecars name both."""
        one = self.authority
        two = Authority(self.root / "two", self.procs, self.td)
        await one.init(svid_ttl, *database, "--instance", "one")
        signs_at = await two.join(one, *database, "--instance", "two")
        await one.serve()
        # `ca serve` refuses to start an instance whose root may not sign yet
        await trio.sleep_until(now() + max(0.0, (signs_at - utcnow()).total_seconds()))
        await two.serve()
        self.servers = [one, two]
        return self.servers

    async def sidecar(
        self,
        name: str,
        *,
        forward: Addr | None = None,
        outbound: Sequence[tuple[str, Addr]] = (),
        limits: dict[str, Any] | None = None,
        servers: Sequence[Authority] | None = None,
    ) -> Sidecar:
        """A new workload: a join token and the bootstrap bundle from the CLI, then `start`.

        `servers` are the instances its config names (default `self.servers`); the
        token and the bundle come from the first.
        """
        servers = list(servers or self.servers)
        addrs = [s.addr for s in servers]
        assert None not in addrs, "start the authority first"
        directory = self.root / name
        directory.mkdir()
        (directory / "join.token").write_text(await servers[0].token(name) + "\n")
        (directory / "bundle.pem").write_bytes(servers[0].bundle_pem())
        car = Sidecar(
            name,
            directory,
            self.procs,
            servers=[a for a in addrs if a is not None],
            forward=forward,
            outbound=outbound,
            limits=dict(limits or {}),
            td=self.td,
        )
        self.sidecars[name] = car
        await car.start()
        [enrolled] = car.log.find("credentials", how="enrolled")
        assert enrolled["spiffe_id"] == f"spiffe://{self.td}/{name}"
        return car


# -- plain endpoints -----------------------------------------------------------


async def http_get(addr: Addr, path: str, within: float = 5.0) -> tuple[int, bytes]:
    """One HTTP/1.1 GET to an admin listener."""
    with trio.fail_after(within):
        stream = await trio.open_tcp_stream(*addr)
        async with stream:
            request = f"GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n"
            await stream.send_all(request.encode())
            raw = await receive_until_eof(stream)
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


async def receive_until_eof(stream: trio.abc.ReceiveStream, limit: int = 1 << 22) -> bytes:
    out = bytearray()
    for _ in range(1 << 16):
        data = await stream.receive_some(65536)
        if not data:
            return bytes(out)
        out += data
        assert len(out) <= limit, "more data than expected"
    raise AssertionError("stream never ended")


async def receive_exactly(stream: trio.abc.ReceiveStream, n: int) -> bytes:
    out = bytearray()
    for _ in range(n + 1):
        if len(out) >= n:
            return bytes(out)
        data = await stream.receive_some(n - len(out))
        if not data:
            raise EOFError(f"EOF after {len(out)} of {n} bytes")
        out += data
    return bytes(out)


async def echo(stream: trio.SocketStream) -> None:
    try:
        for _ in range(1 << 24):
            data = await stream.receive_some(65536)
            if not data:
                break
            await stream.send_all(data)
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_eof()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # a connection cut by a sidecar: exactly what some tests want


async def serve_echo(*, task_status: trio.TaskStatus[Addr] = trio.TASK_STATUS_IGNORED) -> None:
    """The local app behind the inbound sidecars: echoes every byte."""
    listeners = await trio.open_tcp_listeners(0, host=HOST)
    host, port = listeners[0].socket.getsockname()[:2]
    task_status.started((str(host), int(port)))
    await trio.serve_listeners(echo, listeners)


class RequestFailed(Exception):
    pass


async def request(addr: Addr, payload: bytes, within: float = 5.0) -> None:
    """One short connection: send, get the same bytes back, half-close, see EOF.

    Raises RequestFailed saying what went wrong (refused, cut, wrong bytes, slow).
    """
    try:
        with trio.fail_after(within):
            stream = await trio.open_tcp_stream(*addr)
            async with stream:
                await stream.send_all(payload)
                got = await receive_exactly(stream, len(payload))
                await stream.send_eof()
                rest = await receive_until_eof(stream)
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, EOFError) as exc:
        raise RequestFailed(f"{type(exc).__name__}: {exc}") from None
    except trio.TooSlowError:
        raise RequestFailed(f"no answer within {within}s") from None
    if got != payload or rest:
        raise RequestFailed(f"sent {payload!r}, got {got!r} then {rest!r}")


async def request_ok(addr: Addr, payload: bytes = b"ping") -> bool:
    try:
        await request(addr, payload)
    except RequestFailed:
        return False
    return True


async def wait_until(
    predicate: Callable[[], Awaitable[bool]],
    *,
    within: float = 10.0,
    interval: float = 0.05,
    what: str = "condition",
) -> float:
    """Evaluate `predicate` until it holds; return when it first did."""
    deadline = now() + within
    for _ in range(int(within / interval) + 2):
        if await predicate():
            return now()
        if now() >= deadline:
            break
        await trio.sleep(interval)
    raise AssertionError(f"{what} did not hold within {within}s")


class LiveConnection:
    """A long-lived plain connection through a sidecar that echoes on demand."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.exchanges = 0
        self.cut_at: float | None = None
        self.cut_wall: datetime | None = None

    @classmethod
    async def open(cls, addr: Addr) -> LiveConnection:
        live = cls(await trio.open_tcp_stream(*addr))
        await live.exchange(b"hello")  # through the whole path before anyone relies on it
        return live

    async def exchange(self, payload: bytes, within: float = 5.0) -> None:
        with trio.fail_after(within):
            await self.stream.send_all(payload)
            got = await receive_exactly(self.stream, len(payload))
        assert got == payload, f"sent {payload!r}, got {got!r}"
        self.exchanges += 1

    async def wait_cut(self, within: float) -> float:
        """Read until the connection ends (EOF or reset); return when it did. Closes it."""
        try:
            with trio.fail_after(within):
                for _ in range(1 << 16):
                    try:
                        data = await self.stream.receive_some(65536)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        break
                    if not data:
                        break
                self.cut_at, self.cut_wall = now(), utcnow()
        finally:
            await self.aclose()
        return self.cut_at

    async def still_works(self, payload: bytes = b"still here") -> bool:
        try:
            await self.exchange(payload)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, EOFError):
            return False
        return True

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


# -- traffic -------------------------------------------------------------------


@dataclass
class Traffic:
    """Steady traffic through one path: a new connection per request at a fixed rate,
    plus one long-lived connection that exchanges a message every `live_interval`.

    Every failure is recorded with its time; `run` returns when `stop` is set.
    """

    target: Callable[[], Addr]
    rate: float = 5.0  # new connections per second
    live_interval: float = 1.0
    ok: int = 0
    live_exchanges: int = 0
    failures: list[tuple[float, str]] = field(default_factory=list)
    stop: trio.Event = field(default_factory=trio.Event)

    async def run(self, max_seconds: float) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._requests, max_seconds)
            nursery.start_soon(self._live, max_seconds)

    async def _requests(self, max_seconds: float) -> None:
        start = now()
        for i in range(int(max_seconds * self.rate) + 1):
            if self.stop.is_set():
                return
            try:
                await request(self.target(), f"req-{i}".encode())
                self.ok += 1
            except RequestFailed as exc:
                self.failures.append((now(), f"request {i}: {exc}"))
            with trio.move_on_at(start + (i + 1) / self.rate):
                await self.stop.wait()  # pacing: the next request is due then

    async def _live(self, max_seconds: float) -> None:
        start = now()
        try:
            live = await LiveConnection.open(self.target())
        except (OSError, trio.BrokenResourceError, EOFError, AssertionError) as exc:
            self.failures.append((now(), f"long-lived open: {exc!r}"))
            return
        try:
            for i in range(int(max_seconds / self.live_interval) + 1):
                with trio.move_on_at(start + (i + 1) * self.live_interval):
                    await self.stop.wait()
                if self.stop.is_set():
                    return
                try:
                    await live.exchange(f"tick-{i}".encode())
                    self.live_exchanges += 1
                except (
                    trio.BrokenResourceError,
                    trio.ClosedResourceError,
                    trio.TooSlowError,
                    EOFError,
                    AssertionError,
                ) as exc:
                    self.failures.append((now(), f"long-lived tick {i}: {exc!r}"))
                    return
        finally:
            await live.aclose()


# -- a TLS client with an SVID of its own ----------------------------------------


@dataclass(frozen=True)
class Presented:
    """What a server presented to the probe, and how that looked at the time."""

    at: float
    leaf: x509.Certificate
    roots: tuple[x509.Certificate, ...]  # the authority's bundle when the probe connected
    verified_root: x509.Certificate

    @property
    def serial(self) -> str:
        return f"{self.leaf.serial_number:x}"


class Probe:
    """A plain TLS client (stdlib ssl) holding an SVID from `meshid ca issue`.

    Each connection trusts the authority's bundle as it is on disk at that
    moment, so a presented certificate that verifies proves it chained to a
    root the authority published then.
    """

    def __init__(
        self, name: str, directory: Path, authority: Authority, *, svid_dir: Path | None = None
    ) -> None:
        self.name = name
        self.dir = directory
        self.authority = authority
        self.issued = 0
        self.svid_dir = svid_dir  # a fixed SVID to present; by default the latest issued

    async def issue(self, ttl: str | None = None) -> None:
        out = self.dir / f"svid-{self.issued + 1}"
        await self.authority.issue(self.name, out, ttl)
        self.issued += 1

    @property
    def current(self) -> Path:
        return self.svid_dir or self.dir / f"svid-{self.issued}"

    def leaf(self) -> x509.Certificate:
        return certs_from_pem((self.current / "svid.pem").read_bytes())[0]

    def seconds_left(self) -> float:
        return (self.leaf().not_valid_after_utc - utcnow()).total_seconds()

    def context(self, bundle_pem: bytes) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.check_hostname = False  # an SVID names a SPIFFE ID, checked below
        ctx.load_verify_locations(cadata=bundle_pem.decode())
        ctx.load_cert_chain(self.current / "svid.pem", self.current / "svid.key")
        return ctx

    async def connect(
        self, addr: Addr, expect: str, within: float = 5.0
    ) -> tuple[trio.SSLStream[trio.SocketStream], Presented]:
        """Handshake with `addr`; the server must present an SVID for `expect`."""
        bundle_pem = self.authority.bundle_pem()
        roots = tuple(certs_from_pem(bundle_pem, "bundle"))
        with trio.fail_after(within):
            tcp = await trio.open_tcp_stream(*addr)
            stream = trio.SSLStream(tcp, self.context(bundle_pem), server_hostname=None)
            try:
                await stream.do_handshake()
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
        der = stream.getpeercert(binary_form=True)
        assert der is not None
        leaf = x509.load_der_x509_certificate(der)
        verified = verify_svid([leaf], roots, utcnow())
        assert str(verified.spiffe_id) == sid(expect), verified.spiffe_id
        return stream, Presented(now(), leaf, roots, verified.root)

    async def roundtrip(self, addr: Addr, expect: str, payload: bytes) -> Presented:
        """One connection: handshake, echo `payload`, close."""
        stream, presented = await self.connect(addr, expect)
        try:
            with trio.fail_after(5):
                await stream.send_all(payload)
                got = await receive_exactly(stream, len(payload))
                assert got == payload
                # close_notify both ways, so the sidecar logs a clean close, not a truncation
                transport, _ = await stream.unwrap()
                await transport.aclose()
        finally:
            await trio.aclose_forcefully(stream)
        return presented

    async def open_live(self, addr: Addr, expect: str) -> LiveConnection:
        """A long-lived connection to `addr` that has echoed once."""
        stream, _ = await self.connect(addr, expect)
        live = LiveConnection(stream)
        await live.exchange(b"hello")
        return live

    async def roundtrip_ok(self, addr: Addr, expect: str, payload: bytes = b"probe") -> bool:
        """True if a connection got through and echoed; False if it was refused or cut."""
        try:
            await self.roundtrip(addr, expect, payload)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, EOFError):
            return False
        except trio.TooSlowError:
            return False
        return True


def distinct(values: Iterable[str]) -> list[str]:
    """The values in first-seen order, without repeats."""
    return list(dict.fromkeys(values))


def changes(values: Sequence[Any]) -> int:
    """How many times consecutive values differ."""
    return sum(1 for a, b in itertools.pairwise(values) if a != b)
