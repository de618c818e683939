"""Operating a running mesh: status, dry runs, rollover acknowledgements, quarantine, audit.

A real control plane and real dynamic-mode sidecars (enrolled from join
tokens) in this process, over TLS on 127.0.0.1; the operator's commands
are the real CLI, run in a worker thread so the mesh keeps serving.
"""

from __future__ import annotations

import io
import json
import sqlite3
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import trio
from ca_helpers import TD, Clock, run
from click.testing import Result

from ca.authority import Authority
from ca.server import ControlPlane, ServerOptions
from meshid.clock import system_clock
from meshid.report import StatusReport
from meshid.spiffeid import SpiffeId
from meshid.svid import certs_to_pem, generate_key, key_to_pem
from sidecar.app import Sidecar
from sidecar.config import parse_config
from sidecar.events import EventLog

WEB = SpiffeId(TD, "/web")
API = SpiffeId(TD, "/api")


class Log(io.StringIO):
    """The decision log, kept for assertions."""

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        lines = [json.loads(line) for line in self.getvalue().splitlines() if line]
        return [e for e in lines if name is None or e["event"] == name]


@dataclass
class Mesh:
    state: Path
    authority: Authority  # the test's own handle (the server has another)
    port: int
    web: Sidecar
    api: Sidecar
    web_log: Log
    api_log: Log
    backend: tuple[str, int]
    extra: dict[str, Any] = field(default_factory=dict)

    async def cli(self, *args: str) -> Result:
        return await trio.to_thread.run_sync(lambda: run(*args, "--state", str(self.state)))


async def wait_for(condition: Callable[[], Any], deadline: float = 10.0) -> Any:
    """Poll a condition until it holds, with a deadline (the thing waited on is in another
    thread or the database, so there is no event to wait on)."""
    with trio.fail_after(deadline):
        while not (value := condition()):  # noqa: ASYNC110
            await trio.sleep(0.02)
    return value


async def echo(stream: trio.SocketStream) -> None:
    try:
        async for data in stream:
            await stream.send_all(data)
    except trio.BrokenResourceError:
        pass


def sidecar_config(
    tmp: Path, name: str, port: int, token: str, extra: dict[str, Any]
) -> dict[str, Any]:
    (tmp / f"{name}.token").write_text(token + "\n")
    return {
        "identity": name,
        "trust_domain": TD.name,
        "authority": {
            "server": f"127.0.0.1:{port}",
            "bundle": "bundle.pem",
            "token_file": f"{name}.token",
            "state_dir": f"{name}-state",
        },
        "admin": {"listen": "127.0.0.1:0"},
        **extra,
    }


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Mesh]:
    state = tmp_path / "ca"
    Authority.init(state, TD, svid_ttl=timedelta(minutes=10), clock=system_clock()).close()
    served = Authority.open(state, clock=system_clock())
    authority = Authority.open(state, clock=system_clock())
    (tmp_path / "bundle.pem").write_bytes(authority.bundle().to_pem())
    authority.allow(WEB, API)
    plane = ControlPlane(
        served,
        ServerOptions(host="127.0.0.1", port=0, poll_interval=0.05),
        log=lambda *a, **k: None,
        clock=system_clock(),
    )
    async with trio.open_nursery() as nursery:
        _, port = await nursery.start(plane.serve)
        listeners = await nursery.start(trio.serve_tcp, echo, 0)
        backend = listeners[0].socket.getsockname()[:2]
        api_log, web_log = Log(), Log()
        limits = {
            "limits": {
                "quarantine_failures": 3,
                "quarantine_address_failures": 3,
                "quarantine_period": 300,
            }
        }
        api_cfg = sidecar_config(
            tmp_path,
            "api",
            port,
            authority.create_token(API),
            {"inbound": {"listen": "127.0.0.1:0", "forward": f"127.0.0.1:{backend[1]}"}, **limits},
        )
        api = Sidecar(parse_config(api_cfg, tmp_path), events=EventLog(api_log))
        await nursery.start(api.run)
        web_cfg = sidecar_config(
            tmp_path,
            "web",
            port,
            authority.create_token(WEB),
            {
                "outbound": [
                    {
                        "listen": "127.0.0.1:0",
                        "upstream": f"127.0.0.1:{api.bound['inbound[0]'][1]}",
                        "identity": "api",
                    }
                ]
            },
        )
        web = Sidecar(parse_config(web_cfg, tmp_path), events=EventLog(web_log))
        await nursery.start(web.run)
        yield Mesh(state, authority, port, web, api, web_log, api_log, backend)
        nursery.cancel_scope.cancel()
    authority.close()
    served.close()


async def open_through(mesh: Mesh) -> trio.SocketStream:
    """A connection app -> web's outbound -> api's inbound -> echo, proven by a round trip."""
    stream = await trio.open_tcp_stream(*mesh.web.bound["outbound[0]"])
    await stream.send_all(b"ping")
    with trio.fail_after(10):
        assert await stream.receive_some(4) == b"ping"
    return stream


def reported(mesh: Mesh, sid: SpiffeId, direction: str, peer: SpiffeId) -> bool:
    for entry in mesh.authority.reports()[0]:
        if entry.spiffe_id == sid:
            for pair in entry.report.pairs:
                if pair.direction == direction and pair.peer_id == peer:
                    return True
    return False


async def test_dry_run_lists_what_a_deny_would_cut_and_changes_nothing(mesh: Mesh) -> None:
    stream = await open_through(mesh)
    await wait_for(lambda: reported(mesh, WEB, "outbound", API))
    await wait_for(lambda: reported(mesh, API, "inbound", WEB))
    version = mesh.authority.policy().version

    result = await mesh.cli("policy", "deny", "web", "api", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "would cut 1 live connection(s)" in result.output
    assert f"{WEB}" in result.output and "outbound -> " in result.output
    assert mesh.authority.policy().version == version
    await stream.send_all(b"still")  # and the connection was not touched
    with trio.fail_after(10):
        assert await stream.receive_some(5) == b"still"

    # the negative twin: a pair with no live connection, and a pair not on the list
    result = await mesh.cli("policy", "deny", "api", "web", "--dry-run")
    assert result.exit_code == 0 and "was not allowed" in result.output
    assert "would change nothing" in result.output
    assert mesh.authority.policy().version == version
    await stream.aclose()


async def test_policy_check_explains_against_the_live_state(mesh: Mesh) -> None:
    allowed = await mesh.cli("policy", "check", "web", "api")
    assert allowed.exit_code == 0
    assert allowed.output.startswith("allowed: allowed by rule") and "policy version 1" in (
        allowed.output
    )
    denied = await mesh.cli("policy", "check", "api", "web")
    assert denied.exit_code == 1
    assert "default deny" in denied.output and len(denied.output.strip().splitlines()) == 1


async def test_status_shows_running_sidecars_and_warns_on_a_lagging_bundle(mesh: Mesh) -> None:
    await wait_for(lambda: len(mesh.authority.reports()[0]) == 2)
    result = await mesh.cli("ca", "status")
    assert result.exit_code == 0, result.output
    assert "WARNING" not in result.output
    for sid in (WEB, API):
        assert f"  {sid} [" in result.output
    assert "bundle 1" in result.output

    # a sidecar reporting an old bundle is named, and a rollover waits for it
    mesh.authority.record_report(SpiffeId(TD, "/batch"), _seq("stale0", 0))
    result = await mesh.cli("ca", "status")
    assert "WARNING spiffe://example.org/batch [stale0]: holds bundle 0, current is 1" in (
        result.output
    )


def _seq(instance: str, bundle_sequence: int) -> StatusReport:
    return StatusReport(instance, bundle_sequence=bundle_sequence)


def test_rollover_waits_for_every_live_sidecar_unless_forced(
    state: Path, authority: Authority, clock: Clock
) -> None:
    authority.record_report(WEB, _seq("w1", 1))
    generation, _ = authority.rotate(timedelta(0))
    authority.advance_roots()
    assert authority.signer()[0] == 1  # not yet: w1 has not confirmed bundle 2
    status = authority.rotation_status()
    assert status == (generation, [f"{WEB} (w1)"])

    authority.record_report(WEB, _seq("w1", 2))
    authority.advance_roots()
    assert authority.signer()[0] == generation
    assert authority.rotation_status() is None

    # forced: the lagging sidecar is not waited for
    forced, _ = authority.rotate(timedelta(0), wait_for_acks=False)
    authority.advance_roots()
    assert authority.signer()[0] == forced

    # a sidecar silent for longer than 30 s is not waited for either
    authority.record_report(API, _seq("a1", 0))
    later, _ = authority.rotate(timedelta(0))
    clock.advance(timedelta(seconds=31))
    authority.advance_roots()
    assert authority.signer()[0] == later


async def test_quarantine_blocks_a_hammering_peer_and_spares_the_rest(
    mesh: Mesh, tmp_path: Path
) -> None:
    inbound = mesh.api.bound["inbound[0]"]
    # An attacker from another loopback address with a certificate from a foreign CA.
    foreign = Authority.init(tmp_path / "foreign", TD, clock=system_clock())
    key = generate_key()
    issued = foreign.issue(WEB, key.public_key())
    (tmp_path / "evil.pem").write_bytes(certs_to_pem(issued.chain))
    (tmp_path / "evil.key").write_bytes(key_to_pem(key))
    foreign.close()
    ctx = ssl.create_default_context(cadata=mesh.authority.bundle().to_pem().decode())
    ctx.check_hostname = False
    ctx.load_cert_chain(tmp_path / "evil.pem", tmp_path / "evil.key")

    async def attempt() -> None:
        sock = trio.socket.socket()
        await sock.bind(("127.0.0.2", 0))
        await sock.connect(inbound)
        stream = trio.SSLStream(trio.SocketStream(sock), ctx)
        try:
            await stream.do_handshake()
            await stream.send_all(b"x")
            await stream.receive_some(1)  # TLS 1.3: the refusal arrives on the first read
        except (trio.BrokenResourceError, ssl.SSLError, OSError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    with trio.fail_after(20):
        for _ in range(3):
            await attempt()
        quarantined = await wait_for(lambda: mesh.api_log.events("peer_quarantined"))
        assert quarantined[0]["peer"] == "127.0.0.2" and quarantined[0]["kind"] == "address"
        await attempt()
        refusals = await wait_for(
            lambda: [
                e
                for e in mesh.api_log.events("decision")
                if e["reason"] == "peer_quarantined" and e["peer_addr"].startswith("127.0.0.2:")
            ]
        )
    assert len(refusals) == 1
    metrics = mesh.api.metrics.exposition().decode()
    assert 'meshid_peer_quarantines_total{kind="address"} 1.0' in metrics
    assert "meshid_quarantined_peers 1.0" in metrics

    # the legitimate peer, from 127.0.0.1, is unaffected
    stream = await open_through(mesh)
    await stream.aclose()
    # and the control plane hears of it
    await wait_for(
        lambda: any(r.report.quarantined for r in mesh.authority.reports()[0] if r.spiffe_id == API)
    )
    status = await mesh.cli("ca", "status")
    assert "peer_quarantined 127.0.0.2" in status.output


def test_audit_chain_verifies_and_an_edited_row_is_caught(state: Path) -> None:
    ok = run("ca", "audit", "verify", "--state", str(state))
    assert ok.exit_code == 0 and "audit log intact" in ok.output
    export = run("ca", "audit", "export", "--state", str(state))
    first = json.loads(export.output.splitlines()[0])
    assert first["action"] == "init" and len(first["hash"]) == 64

    conn = sqlite3.connect(state / "authority.db")
    conn.execute('UPDATE audit SET details = \'{"trust_domain":"evil.org"}\' WHERE seq = 1')
    conn.commit()
    conn.close()
    bad = run("ca", "audit", "verify", "--state", str(state))
    assert bad.exit_code == 1
    assert "audit log tampered: entry 1 was modified" in bad.output


async def test_a_refused_peer_is_told_bad_certificate_not_internal_error(
    mesh: Mesh, tmp_path: Path
) -> None:
    """TLS 1.3: the refusal arrives on the client's first read, as an alert it can name."""
    key = generate_key()
    issued = mesh.authority.issue(SpiffeId(TD, "/batch"), key.public_key())
    (tmp_path / "batch.pem").write_bytes(certs_to_pem(issued.chain))
    (tmp_path / "batch.key").write_bytes(key_to_pem(key))
    ctx = ssl.create_default_context(cadata=mesh.authority.bundle().to_pem().decode())
    ctx.check_hostname = False
    ctx.load_cert_chain(tmp_path / "batch.pem", tmp_path / "batch.key")
    stream = trio.SSLStream(
        await trio.open_tcp_stream(*mesh.api.bound["inbound[0]"]), ctx, server_hostname=None
    )
    with trio.fail_after(10), pytest.raises(trio.BrokenResourceError) as info:
        await stream.do_handshake()
        await stream.send_all(b"hello")
        await stream.receive_some(10)
    assert isinstance(info.value.__cause__, ssl.SSLError)
    assert "BAD_CERTIFICATE" in str(info.value.__cause__).upper()
    await trio.aclose_forcefully(stream)
    refusal = await wait_for(
        lambda: [e for e in mesh.api_log.events("decision") if e.get("peer_id") == f"{TD.id}/batch"]
    )
    assert refusal[0]["reason"] == "not_allowed"


async def test_revoking_a_serial_cuts_that_svid_through_the_feed(mesh: Mesh) -> None:
    """`ca revoke --serial`: the feed carries it, api's sidecar cuts web's live connection,
    and web's sidecar, refused by the authority with that SVID, cuts itself off."""
    stream = await open_through(mesh)
    svid = mesh.web.current_svid()
    assert svid is not None
    result = await mesh.cli("ca", "revoke", "--serial", f"{svid.serial:x}")
    assert result.exit_code == 0, result.output
    with trio.fail_after(10):
        try:
            while await stream.receive_some(100):
                pass
        except trio.BrokenResourceError:
            pass  # the cut ends the stream, by a close or a reset
    closes = await wait_for(
        lambda: [e for e in mesh.api_log.events("close") if e.get("reason") == "identity_revoked"]
    )
    assert closes[0]["peer_id"] == str(WEB)
    # web's own sidecar is refused its feed with that SVID: it cuts itself off until it
    # enrolls again, and is not told that its identity is revoked (it is not)
    said = await wait_for(lambda: mesh.web_log.events("svid_revoked"))
    assert said[0]["serial"] == f"{svid.serial:x}" and said[0]["reason"] == "identity_revoked"
    assert mesh.web_log.events("identity_revoked") == []
    await stream.aclose()
