"""A sidecar that names several authority servers fails over between them, over real sockets.

One authority (its control plane in this process) is reached through two
loopback TCP forwarders that the test owns, and `authority.server` lists
both. Taking a forwarder down closes its listener and every connection
through it, as a host that goes away does; its port stays the test's (a
bound socket that does not listen), so connections to it are refused and it
can come back on the same address. Failover timings are injected (`Pacing`)
so that nothing waits seconds.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
from sidecar_helpers import (
    TD,
    Addr,
    Backend,
    Creds,
    LogCapture,
    client_context,
    fmt,
    metric,
    read_events,
    receive_exactly,
    running_cli,
    tls_connect,
    wait_cut,
    wait_event,
)
from test_sidecar_control_failures import (
    FAST,
    Served,
    control_plane,
    enrollable,
    http,
    make_authority,
)

from ca.authority import Authority
from ca.server import ControlPlane, ServerOptions
from meshid.clock import system_clock
from meshid.events import EventLog
from meshid.spiffeid import SpiffeId
from meshid.svid import generate_key
from sidecar.app import Sidecar
from sidecar.config import parse_config
from sidecar.control import ControlPlaneError
from sidecar.failover import Backoff
from sidecar.renewal import Pacing

WEB = SpiffeId(TD, "/web")
API = SpiffeId(TD, "/api")
PACING = Pacing(schedule=FAST, slow_retry=0.5, failover=Backoff(base=0.05, cap=0.2))


def _reusable() -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    return sock


async def _copy(source: trio.SocketStream, sink: trio.SocketStream, done: trio.CancelScope) -> None:
    try:
        for _ in range(1_000_000):
            data = await source.receive_some(65536)
            if not data:
                break
            await sink.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    done.cancel()  # one side ended: the whole connection ends, as a TCP proxy's does


class Forwarder:
    """A TCP forwarder on 127.0.0.1 in front of `target`, that the test takes down and back up."""

    def __init__(self, target: Addr) -> None:
        self.target = target
        self._hold = _reusable()  # bound, never listening: the port stays ours while down
        self._hold.bind(("127.0.0.1", 0))
        self.addr: Addr = self._hold.getsockname()[:2]
        self.accepted = 0
        self._scope: trio.CancelScope | None = None
        self._stopped = trio.Event()

    @property
    def name(self) -> str:
        return fmt(self.addr)

    async def up(self, nursery: trio.Nursery) -> None:
        assert self._scope is None, "already up"
        await nursery.start(self._serve)

    async def down(self) -> None:
        """Close the listener and every connection through it; return once they are closed."""
        assert self._scope is not None, "already down"
        self._scope.cancel()
        self._scope = None
        await self._stopped.wait()

    def close(self) -> None:
        self._hold.close()

    async def _serve(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        sock = _reusable()
        sock.bind(self.addr)
        sock.listen()
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        self._stopped = stopped = trio.Event()
        try:
            with trio.CancelScope() as scope:
                self._scope = scope
                async with listener, trio.open_nursery() as pipes:
                    task_status.started()
                    for _ in range(100_000):
                        stream = await listener.accept()
                        self.accepted += 1
                        pipes.start_soon(self._pipe, stream)
        finally:
            stopped.set()

    async def _pipe(self, client: trio.SocketStream) -> None:
        async with client:
            try:
                upstream = await trio.open_tcp_stream(*self.target)
            except OSError:
                return
            async with upstream, trio.open_nursery() as both:
                both.start_soon(_copy, client, upstream, both.cancel_scope)
                both.start_soon(_copy, upstream, client, both.cancel_scope)


def sidecar_doc(servers: list[str], backend: Addr, state_dir: Path) -> dict[str, Any]:
    return {
        "identity": "api",
        "trust_domain": TD.name,
        "authority": {
            "server": servers,
            "bundle": "bundle.pem",
            "token_file": "token",
            "state_dir": str(state_dir),
        },
        "inbound": [{"listen": "127.0.0.1:0", "forward": fmt(backend)}],
        "admin": {"listen": "127.0.0.1:0"},
    }


@dataclass
class World:
    """api's sidecar, enrolled through the first of two forwarders to one authority."""

    sidecar: Sidecar
    log: LogCapture
    first: Forwarder
    second: Forwarder
    handle: Authority  # the test's own, as `meshid policy` in another process would use
    served: Served
    nursery: trio.Nursery
    tmp: Path

    async def readyz(self) -> tuple[int, str]:
        return await http(self.sidecar.bound["admin"], "/readyz")

    def in_use(self, forwarder: Forwarder) -> float:
        return metric(self.sidecar, "meshid_authority_server", server=forwarder.name)

    async def renew(self) -> str:
        """One renewal, as the renewer makes it; the new serial."""
        assert self.sidecar.dynamic is not None
        renewed = len(self.log.find("credentials", how="renewed"))
        await self.sidecar.dynamic.renew()
        found = self.log.find("credentials", how="renewed")
        assert len(found) == renewed + 1
        return str(found[-1]["serial"])

    async def web_connection(self) -> trio.SSLStream[trio.SocketStream]:
        """A live mTLS connection from web to api's inbound, echoing through api's app."""
        key = generate_key()
        issued = self.handle.issue(WEB, key.public_key())
        bundle = self.handle.bundle().to_pem()
        ctx: ssl.SSLContext = client_context(self.tmp / "web", bundle, Creds(issued.chain, key))
        stream = await tls_connect(self.sidecar.bound["inbound[0]"], ctx)
        await stream.send_all(b"ping")
        assert await receive_exactly(stream, 4) == b"ping"
        return stream


@pytest.fixture
async def world(tmp_path: Path, backend: Backend) -> AsyncIterator[World]:
    authority, config_dir = enrollable(tmp_path, API)
    handle = Authority.open(tmp_path / "authority", clock=system_clock())
    handle.allow(WEB, API)
    served = control_plane(authority)
    first = second = None
    try:
        # The fixture's own nursery: everything using the authority stops before it closes.
        async with trio.open_nursery() as nursery:
            plane = await nursery.start(served.plane.serve)
            first, second = Forwarder(plane), Forwarder(plane)
            await first.up(nursery)
            await second.up(nursery)
            log = LogCapture()
            doc = sidecar_doc([first.name, second.name], backend.addr, tmp_path / "state")
            sidecar = Sidecar(parse_config(doc, config_dir), events=EventLog(log), pacing=PACING)
            with trio.fail_after(20):
                await nursery.start(sidecar.run)
            yield World(sidecar, log, first, second, handle, served, nursery, tmp_path)
            nursery.cancel_scope.cancel()
    finally:
        for forwarder in (first, second):
            if forwarder is not None:
                forwarder.close()
        handle.close()
        authority.close()


async def test_renewal_and_the_feed_fail_over_to_the_second_server_and_back(world: World) -> None:
    first, second, log = world.first, world.second, world.log
    with trio.fail_after(30):
        # Enrolled through the first server, which it keeps while it works.
        assert first.accepted >= 1 and second.accepted == 0
        assert await world.readyz() == (200, f"ready\nauthority server: {first.name} (1 of 2)\n")
        assert (world.in_use(first), world.in_use(second)) == (1, 0)
        live = await world.web_connection()

        # The first goes away: the feed's long poll breaks, and the sidecar moves on.
        await first.down()
        with trio.fail_after(5):
            [moved] = await log.wait_for("authority_failover", left=first.name, to=second.name)
        assert moved["reason"] in ("authority_unreachable", "authority_protocol"), moved
        assert 0 <= moved["retry_in_s"] <= 0.05
        # Renewal goes through the second.
        through_second = second.accepted
        await world.renew()
        assert second.accepted > through_second
        # The feed too: a deny made at the authority reaches the sidecar and cuts the
        # live connection of the pair.
        world.handle.deny(WEB, API)
        with trio.fail_after(5):
            assert await wait_cut(live) == b""
            [closed] = await log.wait_for("close", reason="policy_revoked")
        assert closed["peer_id"] == str(WEB)
        await trio.aclose_forcefully(live)
        assert await world.readyz() == (200, f"ready\nauthority server: {second.name} (2 of 2)\n")
        assert (world.in_use(first), world.in_use(second)) == (0, 1)
        assert metric(world.sidecar, "meshid_authority_failovers_total") == 1

        # The first comes back and the second goes: it fails back.
        await first.up(world.nursery)
        await second.down()
        with trio.fail_after(5):
            await log.wait_for("authority_failover", left=second.name, to=first.name)
        through_first = first.accepted
        await world.renew()
        assert first.accepted > through_first
        policies = len(log.find("policy"))
        world.handle.allow(WEB, API)
        with trio.fail_after(5):
            await log.wait_for("policy", count=policies + 1)
        live = await world.web_connection()  # allowed again, through the feed of the first
        await trio.aclose_forcefully(live)
        assert await world.readyz() == (200, f"ready\nauthority server: {first.name} (1 of 2)\n")
    # Each move was said once, though every duty saw the server it left fail.
    assert len(log.find("authority_failover")) == 2
    assert metric(world.sidecar, "meshid_authority_failovers_total") == 2
    assert not log.find("renewal_failed")


async def test_with_every_server_down_a_serving_sidecar_degrades_as_before(world: World) -> None:
    log = world.log
    with trio.fail_after(30):
        await world.first.down()
        await world.second.down()
        await log.wait_for("watch_failed", reason="authority_unreachable")
        await log.wait_for("report_failed", reason="authority_unreachable")
        # It serves on with what it holds, as with one server.
        status, body = await world.readyz()
        assert status == 200 and body.startswith("ready\nauthority server: "), body
        with pytest.raises(ControlPlaneError, match="connection refused") as failed:
            await world.renew()
        assert failed.value.reason == "authority_unreachable" and not failed.value.permanent
        # One comes back: the next poll finds it, and a change made meanwhile arrives.
        policies = len(log.find("policy"))
        world.handle.deny(WEB, API)
        await world.second.up(world.nursery)
        await log.wait_for("policy", count=policies + 1)
        await world.renew()


async def test_enrollment_waits_for_any_server_when_all_are_down(
    tmp_path: Path, backend: Backend
) -> None:
    authority, config_dir = enrollable(tmp_path, API)
    dead = [Forwarder(("127.0.0.1", 9)), Forwarder(("127.0.0.1", 9))]  # never up: refused
    log = LogCapture()
    doc = sidecar_doc([d.name for d in dead], backend.addr, tmp_path / "state")
    sidecar = Sidecar(parse_config(doc, config_dir), events=EventLog(log), pacing=PACING)
    served = control_plane(authority)
    try:
        async with trio.open_nursery() as nursery:  # stopped before the authority closes
            with trio.fail_after(20):
                nursery.start_soon(sidecar.run)
                failed = await log.wait_for("enroll_failed", count=3)
                assert {f["reason"] for f in failed} == {"authority_unreachable"}
                moves = log.find("authority_failover")
                assert {(m["left"], m["to"]) for m in moves} == {
                    (dead[0].name, dead[1].name),
                    (dead[1].name, dead[0].name),
                }
                # Each wait is drawn below a ceiling that doubles with the failures, to the cap.
                ceilings = [min(0.2, 0.05 * 2 ** (m["failures"] - 1)) for m in moves]
                assert all(0 <= m["retry_in_s"] <= c for m, c in zip(moves, ceilings, strict=True))
                assert max(m["failures"] for m in moves) >= 2
                status, body = await http(sidecar.bound["admin"], "/readyz")
                assert status == 503
                assert body.startswith(
                    "not ready: enrolling: authority unreachable (connection refused), attempt "
                ), body
                assert body.endswith(" of 2)\n") and "\nauthority server: " in body
                # The authority comes up behind the second: the sidecar enrolls through it.
                plane = await nursery.start(served.plane.serve)
                dead[1].target = plane
                await dead[1].up(nursery)
                await log.wait_for("started")
                [enrolled] = log.find("credentials", how="enrolled")
                assert enrolled["spiffe_id"] == str(API)
            nursery.cancel_scope.cancel()
    finally:
        for d in dead:
            d.close()
        authority.close()


async def _serve_until(
    plane: ControlPlane,
    scope: trio.CancelScope,
    *,
    task_status: trio.TaskStatus[Addr] = trio.TASK_STATUS_IGNORED,
) -> None:
    with scope:
        await plane.serve(task_status=task_status)


def _presented(addr: Addr, bundle: bytes) -> Any:
    """The serial of the certificate a control plane presents, and the names in it (blocking)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=bundle.decode())
    with socket.create_connection(addr, timeout=5) as raw, ctx.wrap_socket(raw) as tls:
        cert = tls.getpeercert()
    assert cert is not None
    return cert["serialNumber"], sorted(cert["subjectAltName"])


async def test_each_instance_is_verified_by_the_authority_identity_not_a_host_name(
    tmp_path: Path, backend: Backend
) -> None:
    """Two instances, each with its own serving certificate, and an impostor listed first."""
    authority, config_dir = enrollable(tmp_path, API)
    other = Authority.open(tmp_path / "authority", clock=system_clock())  # the second instance's
    stranger = make_authority(tmp_path / "stranger")  # same trust domain, another root
    bundle = authority.bundle().to_pem()
    planes = []
    for handle, name in ((authority, "ca1.internal"), (other, "ca2.internal")):
        options = ServerOptions(host="127.0.0.1", port=0, poll_interval=0.05, dns_names=(name,))
        planes.append(ControlPlane(handle, options, log=lambda *a, **k: None, clock=system_clock()))
    impostor = control_plane(stranger)
    scopes = [trio.CancelScope(), trio.CancelScope()]
    try:
        async with trio.open_nursery() as nursery:  # stopped before the authority closes
            addrs = [
                await nursery.start(_serve_until, p, s) for p, s in zip(planes, scopes, strict=True)
            ]
            fake = await nursery.start(impostor.plane.serve)
            serial1, names1 = await trio.to_thread.run_sync(_presented, addrs[0], bundle)
            serial2, names2 = await trio.to_thread.run_sync(_presented, addrs[1], bundle)
            assert serial1 != serial2 and names1 != names2  # each its own certificate
            assert ("DNS", "ca1.internal") in names1 and ("DNS", "ca2.internal") in names2
            log = LogCapture()
            servers = [fmt(fake), fmt(addrs[0]), fmt(addrs[1])]
            doc = sidecar_doc(servers, backend.addr, tmp_path / "state")
            sidecar = Sidecar(parse_config(doc, config_dir), events=EventLog(log), pacing=PACING)
            with trio.fail_after(30):
                await nursery.start(sidecar.run)
                # The impostor does not chain to our bundle: skipped, and nothing sent to it.
                [skipped] = log.find("authority_failover", left=servers[0])
                assert (skipped["reason"], skipped["to"]) == ("authority_untrusted", servers[1])
                assert impostor.requests == []
                # The first instance goes: the second, with another certificate and another
                # host name, is the authority all the same.
                scopes[0].cancel()
                await log.wait_for("authority_failover", left=servers[1], to=servers[2])
                assert sidecar.dynamic is not None
                await sidecar.dynamic.renew()
                assert log.find("credentials", how="renewed")
                status, body = await http(sidecar.bound["admin"], "/readyz")
                assert (status, body) == (200, f"ready\nauthority server: {servers[2]} (3 of 3)\n")
            nursery.cancel_scope.cancel()
    finally:
        other.close()
        stranger.close()
        authority.close()


async def test_the_cli_reads_a_list_of_servers_from_toml(tmp_path: Path, backend: Backend) -> None:
    """`meshid sidecar run` itself, with `server = [...]` in its file: the first is down."""
    authority, config_dir = enrollable(tmp_path, API)
    served = control_plane(authority)
    down = Forwarder(("127.0.0.1", 9))  # its port is held and never listens: refused
    try:
        async with trio.open_nursery() as nursery:  # stopped before the authority closes
            plane = await nursery.start(served.plane.serve)
            config = config_dir / "sidecar.toml"
            config.write_text(
                'identity = "api"\ntrust_domain = "example.org"\n\n[authority]\n'
                f'server = ["{down.name}", "{fmt(plane)}"]\n'
                'bundle = "bundle.pem"\ntoken_file = "token"\nstate_dir = "state"\n\n'
                f'[inbound]\nlisten = "127.0.0.1:0"\nforward = "{fmt(backend.addr)}"\n\n'
                '[log]\nfile = "events.jsonl"\n'
            )
            events = config_dir / "events.jsonl"
            with trio.fail_after(30):
                async with running_cli(config, tmp_path / "stderr.txt") as proc:
                    started = await wait_event(events, "started")
                    moved = await wait_event(events, "authority_failover")
                    assert proc.returncode is None
            nursery.cancel_scope.cancel()
    finally:
        down.close()
        authority.close()
    assert started["spiffe_id"] == str(API)
    assert (moved["left"], moved["to"]) == (down.name, fmt(plane))
    assert moved["reason"] == "authority_unreachable"
    assert [r["how"] for r in read_events(events) if r["event"] == "credentials"] == ["enrolled"]


async def test_the_sidecar_keeps_its_connections_to_the_authority(world: World) -> None:
    """Each change wakes the parked watch and parks the next one; the reports go out
    too. None of it costs a new connection once the sidecar holds its few."""
    first, log = world.first, world.log
    with trio.fail_after(20):
        before = first.accepted
        for change in range(6):
            policies = len(log.find("policy"))
            (world.handle.deny if change % 2 == 0 else world.handle.allow)(WEB, API)
            await log.wait_for("policy", count=policies + 1)
    # at most one more: a report that met the watch parked, before either was kept
    assert first.accepted - before <= 1, first.accepted - before
    assert world.second.accepted == 0


async def test_a_stream_broken_after_a_change_resumes_on_the_other_server_from_it(
    world: World,
) -> None:
    """The feed's stream brought a change, then its server went away: the watch on the
    other server asks from the version the sidecar holds now, not from the one it held
    when the stream began, so it is sent no delta cut from a version it no longer holds
    (refused, then the whole list fetched: for every sidecar at once, on the server left)."""
    log = world.log
    assert world.sidecar.dynamic is not None
    with trio.fail_after(30):
        policies = len(log.find("policy"))
        version = world.handle.allow(SpiffeId(TD, "/db"), API)
        await log.wait_for("policy", count=policies + 1)  # a line of the stream on the first
        assert world.sidecar.dynamic.versions[0] == version
        await world.first.down()
        await log.wait_for("authority_failover", left=world.first.name)
        later = world.handle.deny(SpiffeId(TD, "/db"), API)
        await log.wait_for("policy", count=policies + 2)  # through the second
        assert world.sidecar.dynamic.versions[0] == later
    assert not log.find("feed_delta_refused")
