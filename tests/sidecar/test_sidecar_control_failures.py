"""A dynamic sidecar facing an authority that is wrong, down, or has revoked it.

Permanent mistakes end a sidecar that has no SVID yet, with one line and exit
1 (the real CLI); an authority that is down is waited for, with the admin
listener up and /readyz saying why; a revoked sidecar is unready and polls
its authority slowly. Real TLS on 127.0.0.1 port 0, our own authority; the
retry timings are injected (`Pacing`) so nothing waits a minute.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import trio
from sidecar_helpers import (
    MESHID,
    TD,
    Addr,
    Backend,
    LogCapture,
    closed_port,
    connect,
    fmt,
    receive_all,
    utcnow,
)

from ca.authority import Authority
from ca.server import ControlPlane, ServerOptions
from ca.store import Store
from meshid.clock import ManualClock, system_clock
from meshid.events import EventLog
from meshid.spiffeid import SpiffeId, TrustDomain
from sidecar.app import Sidecar
from sidecar.config import parse_config
from sidecar.control import ControlClient, ControlPlaneError
from sidecar.renewal import Pacing
from sidecar.schedule import Schedule

WEB = SpiffeId(TD, "/web")
FAST = Schedule(backoff_initial=0.02, backoff_max=0.05)


async def http(addr: Addr, path: str) -> tuple[int, str]:
    stream = await connect(addr)
    async with stream:
        request = f"GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n"
        await stream.send_all(request.encode())
        raw = await receive_all(stream, limit=1 << 20)
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body.decode()


def make_authority(directory: Path, trust_domain: TrustDomain = TD) -> Authority:
    born = utcnow() - timedelta(days=1)
    Authority.init(directory, trust_domain, clock=ManualClock(born)).close()
    return Authority.open(directory, clock=system_clock())


def enrollable(tmp_path: Path, identity: SpiffeId) -> tuple[Authority, Path]:
    """An authority in tmp_path/authority, and a sidecar's config directory holding its
    bundle (`bundle.pem`) and a join token for `identity` (`token`)."""
    authority = make_authority(tmp_path / "authority")
    config_dir = tmp_path / identity.path.rsplit("/", 1)[-1]
    config_dir.mkdir()
    (config_dir / "bundle.pem").write_bytes(authority.bundle().to_pem())
    (config_dir / "token").write_text(authority.create_token(identity))
    return authority, config_dir


@dataclass
class Served:
    """Our authority's control plane in this process, and the requests it answered."""

    authority: Authority
    plane: ControlPlane
    requests: list[dict[str, Any]] = field(default_factory=list)


def control_plane(authority: Authority) -> Served:
    served = Served(authority, None)  # type: ignore[arg-type]

    def log(event: str, **fields: Any) -> None:
        if event == "request":
            served.requests.append({"at": trio.current_time(), **fields})

    served.plane = ControlPlane(
        authority,
        ServerOptions(host="127.0.0.1", port=0, poll_interval=0.05, request_timeout=5.0),
        log=log,
        clock=system_clock(),
    )
    return served


def dynamic_doc(server: Addr, state_dir: Path) -> dict[str, Any]:
    return {
        "identity": "web",
        "trust_domain": TD.name,
        "authority": {
            "server": fmt(server),
            "bundle": "bundle.pem",
            "token_file": "token",
            "state_dir": str(state_dir),
        },
        "outbound": [{"listen": "127.0.0.1:0", "upstream": "127.0.0.1:9", "identity": "api"}],
        "admin": {"listen": "127.0.0.1:0"},
    }


# -- the real CLI: permanent mistakes before enrollment ------------------------


def write_cli_config(directory: Path, server: Addr, bundle: bytes, trust_domain: str) -> Path:
    (directory / "bundle.pem").write_bytes(bundle)
    (directory / "web.token").write_text("a-token-that-is-never-accepted\n")
    config = directory / "sidecar.toml"
    config.write_text(
        f'identity = "web"\ntrust_domain = "{trust_domain}"\n'
        f'[authority]\nserver = "{fmt(server)}"\nbundle = "bundle.pem"\n'
        'token_file = "web.token"\nstate_dir = "state"\n'
        '[[outbound]]\nlisten = "127.0.0.1:0"\nupstream = "127.0.0.1:9"\nidentity = "api"\n'
        '[log]\nfile = "events.jsonl"\n'
    )
    return config


async def run_cli(config: Path) -> tuple[int, str]:
    """`meshid sidecar run` to its end: its exit code and its stderr."""
    with trio.fail_after(30):
        done = await trio.run_process(
            [str(MESHID), "sidecar", "run", "--config", str(config)],
            stdin=subprocess.DEVNULL,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    return done.returncode, done.stderr.decode()


async def plain_http(stream: trio.SocketStream) -> None:
    """An HTTP server's answer to whatever it was sent (here, a TLS ClientHello)."""
    await stream.receive_some(4096)
    await stream.send_all(
        b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )


async def test_an_authority_address_that_speaks_plain_http_ends_enrollment(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    responder = Backend(handler=plain_http)
    await nursery.start(responder.serve)
    authority = make_authority(tmp_path / "authority")
    config = write_cli_config(tmp_path, responder.addr, authority.bundle().to_pem(), TD.name)
    authority.close()
    code, stderr = await run_cli(config)
    assert code == 1, stderr
    assert stderr.count("\n") == 1, stderr
    assert stderr.startswith(f"Error: authority at {fmt(responder.addr)} answered plain HTTP"), (
        stderr
    )
    assert "authority.server" in stderr
    assert "WRONG_VERSION_NUMBER" not in stderr
    assert responder.accepted == 1  # not retried


async def test_an_authority_of_another_trust_domain_ends_enrollment(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    other = make_authority(tmp_path / "authority", TrustDomain("other.org"))
    served = control_plane(other)
    try:
        addr = await nursery.start(served.plane.serve)
        config = write_cli_config(tmp_path, addr, other.bundle().to_pem(), TD.name)
        code, stderr = await run_cli(config)
    finally:
        other.close()
    assert code == 1, stderr
    assert stderr.count("\n") == 1, stderr
    assert "the authority's trust domain is other.org but this sidecar's is example.org" in stderr
    assert served.requests == []  # nothing was sent to a server of another trust domain


async def test_an_authority_that_does_not_chain_to_the_bundle_ends_enrollment(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    real = make_authority(tmp_path / "authority")
    stranger = make_authority(tmp_path / "stranger")  # same trust domain, another root
    served = control_plane(real)
    try:
        addr = await nursery.start(served.plane.serve)
        config = write_cli_config(tmp_path, addr, stranger.bundle().to_pem(), TD.name)
        code, stderr = await run_cli(config)
    finally:
        real.close()
        stranger.close()
    assert code == 1, stderr
    assert "does not chain to authority.bundle" in stderr and "wrong bundle?" in stderr, stderr
    assert "CERTIFICATE_VERIFY_FAILED" not in stderr


async def test_a_bundle_file_with_no_certificate_ends_the_sidecar(tmp_path: Path) -> None:
    dead = await closed_port()
    with dead:
        config = write_cli_config(tmp_path, dead.getsockname()[:2], b"not a bundle\n", TD.name)
        code, stderr = await run_cli(config)
    assert code == 1, stderr
    assert stderr.count("\n") == 1, stderr
    assert "bundle.pem holds no certificate" in stderr, stderr


# -- waiting for an authority that is down -------------------------------------


async def test_admin_answers_while_the_authority_is_down_then_ready_once_enrolled(
    tmp_path: Path,
) -> None:
    authority = make_authority(tmp_path / "authority")
    config_dir = tmp_path / "web"
    config_dir.mkdir()
    (config_dir / "bundle.pem").write_bytes(authority.bundle().to_pem())
    (config_dir / "token").write_text(authority.create_token(WEB))
    # The authority's port: bound, not yet listening, so connections are refused.
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    served = control_plane(authority)
    log = LogCapture()
    sidecar = Sidecar(
        parse_config(dynamic_doc(sock.getsockname()[:2], tmp_path / "state"), config_dir),
        events=EventLog(log),
        pacing=Pacing(schedule=FAST),
    )
    try:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sidecar.run)
                await log.wait_for("enroll_failed", count=3)
                admin = sidecar.bound["admin"]
                assert await http(admin, "/healthz") == (200, "ok\n")
                status, body = await http(admin, "/readyz")
                assert status == 503
                assert body.startswith(
                    "not ready: enrolling: authority unreachable (connection refused), attempt "
                ), body
                assert ", next in " in body
                status, body = await http(admin, "/svid")
                assert status == 503 and "enrolling" in body
                assert (await http(admin, "/metrics"))[0] == 200
                assert not log.find("started")
                # The authority comes up on that port: the next attempt enrolls.
                sock.listen()
                await nursery.start(served.plane.serve, sock)
                await log.wait_for("started")
                assert await http(admin, "/readyz") == (200, "ready\n")
                nursery.cancel_scope.cancel()
    finally:
        sock.close()
        authority.close()
    [enrolled] = log.find("credentials", how="enrolled")
    assert enrolled["spiffe_id"] == str(WEB)


# -- revoked ---------------------------------------------------------------------


@dataclass
class Enrolled:
    sidecar: Sidecar
    log: LogCapture
    served: Served
    authority: Authority  # the test's own handle, as `meshid ca revoke` would use
    tmp: Path

    async def readyz(self) -> tuple[int, str]:
        return await http(self.sidecar.bound["admin"], "/readyz")


@pytest.fixture
async def enrolled(tmp_path: Path) -> AsyncIterator[Enrolled]:
    authority, config_dir = enrollable(tmp_path, WEB)
    handle = Authority.open(tmp_path / "authority", clock=system_clock())
    served = control_plane(authority)
    log = LogCapture()
    async with trio.open_nursery() as nursery:
        addr = await nursery.start(served.plane.serve)
        sidecar = Sidecar(
            parse_config(dynamic_doc(addr, tmp_path / "state"), config_dir),
            events=EventLog(log),
            pacing=Pacing(schedule=FAST, slow_retry=0.5),
        )
        with trio.fail_after(20):
            await nursery.start(sidecar.run)
        yield Enrolled(sidecar, log, served, handle, tmp_path)
        nursery.cancel_scope.cancel()
    handle.close()
    authority.close()


async def test_a_revoked_sidecar_is_unready_and_polls_slowly_until_unrevoked(
    enrolled: Enrolled,
) -> None:
    with trio.fail_after(30):
        assert await enrolled.readyz() == (200, "ready\n")
        enrolled.authority.revoke(WEB)
        await enrolled.log.wait_for("identity_revoked")
        assert await enrolled.readyz() == (503, "not ready: revoked\n")
        # Over a bounded window, count what the authority hears from this revoked sidecar.
        start = trio.current_time()
        window = 2.0
        await trio.sleep(window)
        refused = [
            r
            for r in enrolled.served.requests
            if r["at"] >= start and r["status"] == 403 and r["reason"] == "identity_revoked"
        ]
        # Its watch and its reports each retry every 0.5 s (±10 %): about 4 each, not the
        # dozens that a full-rate backoff of 0.02-0.05 s would send.
        assert 1 <= len(refused) <= 12, refused
        assert {r["path"] for r in refused} <= {"/v1/watch", "/v1/report", "/v1/renew"}
        assert await enrolled.readyz() == (503, "not ready: revoked\n")
        assert len(enrolled.log.find("identity_revoked")) == 1  # said once
        # The authority lifts the revocation: the next slow poll brings the sidecar back.
        with enrolled.authority.store.write() as conn:
            conn.execute("DELETE FROM revocations WHERE spiffe_id = ?", (str(WEB),))
            Store.bump(conn, "revocation_version")
        policies = len(enrolled.log.find("policy"))
        await enrolled.log.wait_for("policy", count=policies + 1)
        assert await enrolled.readyz() == (200, "ready\n")


async def test_a_sidecar_whose_svid_is_revoked_by_serial_is_cut_off_until_a_new_token(
    enrolled: Enrolled,
) -> None:
    """`ca revoke --serial` of the SVID a sidecar holds: not "change identity" (the identity
    is fine) but cut off until it enrolls again, which a new join token in its token file
    does at the next slow attempt, without a restart. The spent token is refused."""
    dynamic = enrolled.sidecar.dynamic
    assert dynamic is not None
    with trio.fail_after(30):
        assert await enrolled.readyz() == (200, "ready\n")
        held = dynamic.current.svid()
        assert held is not None
        enrolled.authority.revoke_serial(f"{held.serial:x}")
        [said] = await enrolled.log.wait_for("svid_revoked")
        assert said["reason"] == "identity_revoked"
        assert f"{held.serial:x}" in said["detail"] and f"meshid ca token {WEB}" in said["detail"]
        status, body = await enrolled.readyz()
        assert status == 503 and body.startswith("not ready: revoked\n"), body
        assert f"svid {held.serial:x} revoked" in body
        # the spent token still in the file is refused, once: it is not sent again
        await enrolled.log.wait_for("watch_failed", reason="token_used", count=3)
        enrolls = [r for r in enrolled.served.requests if r["path"] == "/v1/enroll"]
        assert len(enrolls) == 2, enrolls  # the first start's, and the refused one
        assert not enrolled.log.find("identity_revoked")  # not told to change identity
        policies = len(enrolled.log.find("policy"))
        (enrolled.tmp / "web" / "token").write_text(enrolled.authority.create_token(WEB))
        await enrolled.log.wait_for("credentials", how="enrolled", count=2)
        await enrolled.log.wait_for("policy", count=policies + 1)  # the authority's, whole
        assert await enrolled.readyz() == (200, "ready\n")
        again = dynamic.current.svid()
        assert again is not None and again.serial != held.serial
        assert len(enrolled.log.find("svid_revoked")) == 1  # said once
    assert enrolled.authority.revocation(WEB) is None


async def test_a_serving_sidecar_outlives_a_permanent_control_plane_failure(
    enrolled: Enrolled, nursery: trio.Nursery
) -> None:
    """Restarted with its SVID on disk but pointed at a plain-HTTP server: it serves on."""
    responder = Backend(handler=plain_http)
    await nursery.start(responder.serve)
    with trio.fail_after(30):
        await enrolled.sidecar.dynamic.state.wait_saved()  # type: ignore[union-attr]
        enrolled.sidecar.request_drain()
        await enrolled.sidecar.stopped.wait()
        log = LogCapture()
        sidecar = Sidecar(
            parse_config(dynamic_doc(responder.addr, enrolled.tmp / "state"), enrolled.tmp / "web"),
            events=EventLog(log),
            pacing=Pacing(schedule=FAST, slow_retry=0.5),
        )
        await nursery.start(sidecar.run)
        [watch] = await log.wait_for("watch_failed", reason="authority_plain_http")
        await log.wait_for("report_failed", reason="authority_plain_http")
        admin = sidecar.bound["admin"]
        status, body = await http(admin, "/readyz")
        start, accepted = trio.current_time(), responder.accepted
        await trio.sleep(1.5)  # a bounded window in which to count its attempts
        attempts = responder.accepted - accepted
    assert (status, body) == (200, "ready\ncontrol plane: authority answered plain HTTP\n")
    assert watch["permanent"] is True and "check authority.server" in watch["detail"]
    assert log.find("credentials", how="restored")
    assert not sidecar.stopped.is_set()
    # watch and report, each every 0.5 s (±10 %), not every 0.02-0.05 s
    assert 1 <= attempts <= 10, (attempts, trio.current_time() - start)


async def test_a_host_that_never_answers_fails_at_the_connect_deadline(tmp_path: Path) -> None:
    """A listener that never accepts: the kernel completes TCP, nobody speaks TLS."""
    with socket.socket() as mute:
        mute.bind(("127.0.0.1", 0))
        mute.listen(0)
        port = mute.getsockname()[1]
        authority = make_authority(tmp_path / "ca")
        try:
            bundle = authority.bundle().to_pem()
        finally:
            authority.close()
        client = ControlClient("127.0.0.1", port, TD, timeout=30.0, connect_timeout=0.3)
        start = trio.current_time()
        with trio.fail_after(10), pytest.raises(ControlPlaneError) as info:
            await client.request("GET", "/v1/watch", None, bundle_pem=bundle, now=utcnow())
        assert trio.current_time() - start < 5  # the connect deadline, not the request's 30 s
        assert info.value.reason == "authority_unreachable" and not info.value.permanent
        assert "no TLS connection within 0.3s" in info.value.message
