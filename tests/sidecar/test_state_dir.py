"""A dynamic sidecar whose state_dir fills up or turns read-only: it keeps serving and enforcing.

Real faults: the state directory lives on a tiny tmpfs that the test fills or
remounts read-only. The control plane and the sidecar run in this process over
real TLS on 127.0.0.1. What must hold while the disk refuses writes: the
sidecar stays up, a deny takes effect at once, a renewal is used, the failure
is logged with its reason and errno, counted, and shown in /readyz (still
200); what is on disk stays a consistent old state; and once the disk takes
writes again, the next attempt saves what is current and the condition clears.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import trio
from cryptography.hazmat.primitives.serialization import Encoding
from sidecar_helpers import (
    TD,
    Addr,
    Backend,
    Creds,
    LogCapture,
    client_context,
    connect,
    expect_refused,
    fmt,
    metric,
    receive_all,
    receive_exactly,
    tls_connect,
    utcnow,
)
from small_fs import SmallFs, small_fs

from ca.authority import Authority
from ca.server import ControlPlane, ServerOptions
from meshid.clock import ManualClock, system_clock
from meshid.events import EventLog
from meshid.spiffeid import SpiffeId
from meshid.svid import certs_from_pem, generate_key, key_from_pem, public_key_matches
from meshid.wire import WatchQuery
from sidecar.app import Sidecar
from sidecar.config import SidecarConfig, parse_config
from sidecar.control import ControlPlaneError
from sidecar.dynamic import DynamicIdentity

WEB = SpiffeId(TD, "/web")
API = SpiffeId(TD, "/api")


@dataclass
class World:
    authority: Authority  # the test's own handle, as `meshid ca` in another process would be
    sidecar: Sidecar
    log: LogCapture
    fs: SmallFs
    state: Path
    tmp: Path
    bundle_pem: bytes
    nursery: trio.Nursery
    config: SidecarConfig
    doc: dict[str, Any]
    config_dir: Path

    @property
    def dynamic(self) -> DynamicIdentity:
        assert self.sidecar.dynamic is not None
        return self.sidecar.dynamic

    def peer_context(self, name: SpiffeId) -> ssl.SSLContext:
        key = generate_key()
        issued = self.authority.issue(name, key.public_key())
        return client_context(self.tmp / "peers", self.bundle_pem, Creds(issued.chain, key))

    @property
    def inbound(self) -> Addr:
        return self.sidecar.bound["inbound[0]"]

    async def readyz(self) -> tuple[int, str]:
        stream = await connect(self.sidecar.bound["admin"])
        async with stream:
            await stream.send_all(b"GET /readyz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            raw = await receive_all(stream, limit=1 << 16)
        head, _, body = raw.partition(b"\r\n\r\n")
        return int(head.split(b" ", 2)[1]), body.decode()

    def on_disk(self) -> tuple[int, str]:
        """The persisted pair's serial (asserting key and certificate belong together)."""
        key_data = (self.state / "svid.key").read_bytes()
        key = key_from_pem(key_data, None)
        [in_key] = certs_from_pem(key_data)
        [in_pem] = certs_from_pem((self.state / "svid.pem").read_bytes())
        assert public_key_matches(key, in_key), "svid.key holds a key and someone else's chain"
        assert in_key.serial_number == in_pem.serial_number
        return in_key.serial_number, f"{in_key.serial_number:x}"

    async def restart(self) -> None:
        """Drain this sidecar and start another on the same config and state_dir."""
        self.sidecar.request_drain()
        await self.sidecar.stopped.wait()
        self.log = LogCapture()
        self.sidecar = Sidecar(self.config, events=EventLog(self.log))
        await self.nursery.start(self.sidecar.run)

    async def enroll_another(self, name: str) -> tuple[Sidecar, LogCapture]:
        """A second sidecar, enrolling now with a new join token, its state_dir on the tmpfs."""
        sid = SpiffeId(TD, f"/{name}")
        (self.config_dir / f"token-{name}").write_text(self.authority.create_token(sid))
        doc = {
            **self.doc,
            "identity": name,
            "authority": {
                **self.doc["authority"],
                "token_file": f"token-{name}",
                "state_dir": str(self.fs.root / name),
            },
        }
        log = LogCapture()
        sidecar = Sidecar(parse_config(doc, self.config_dir), events=EventLog(log))
        await self.nursery.start(sidecar.run)
        return sidecar, log

    def feed_version(self) -> int:
        return int(json.loads((self.state / "feed.json").read_text())["policy_version"])


@pytest.fixture
async def world(tmp_path: Path, backend: Backend) -> AsyncIterator[World]:
    born = utcnow() - timedelta(days=1)
    auth_dir = tmp_path / "authority"
    Authority.init(auth_dir, TD, clock=ManualClock(born)).close()
    served = Authority.open(auth_dir, clock=system_clock())
    authority = Authority.open(auth_dir, clock=system_clock())
    authority.allow(API, WEB)
    bundle_pem = authority.bundle().to_pem()
    config_dir = tmp_path / "web"
    config_dir.mkdir()
    (config_dir / "bundle.pem").write_bytes(bundle_pem)
    (config_dir / "token").write_text(authority.create_token(WEB))
    server = ControlPlane(
        served,
        ServerOptions(host="127.0.0.1", port=0, poll_interval=0.05, request_timeout=5.0),
        log=lambda event, **f: None,
        clock=system_clock(),
    )
    with small_fs(tmp_path / "small") as fs:
        async with trio.open_nursery() as own:
            _host, port = await own.start(server.serve)
            doc: dict[str, Any] = {
                "identity": "web",
                "trust_domain": TD.name,
                "authority": {
                    "server": fmt(("127.0.0.1", port)),
                    "bundle": "bundle.pem",
                    "token_file": "token",
                    "state_dir": str(fs.root / "state"),
                },
                "inbound": {"listen": "127.0.0.1:0", "forward": fmt(backend.addr)},
                "admin": {"listen": "127.0.0.1:0"},
            }
            log = LogCapture()
            config = parse_config(doc, config_dir)
            sidecar = Sidecar(config, events=EventLog(log))
            with trio.fail_after(20):
                await own.start(sidecar.run)
                assert sidecar.dynamic is not None
                await sidecar.dynamic.state.wait_saved()  # the enrollment, on disk
            yield World(
                authority,
                sidecar,
                log,
                fs,
                fs.root / "state",
                tmp_path,
                bundle_pem,
                own,
                config,
                doc,
                config_dir,
            )
            own.cancel_scope.cancel()
    authority.close()
    served.close()


async def _echo(stream: trio.abc.Stream, data: bytes) -> None:
    await stream.send_all(data)
    assert await receive_exactly(stream, len(data)) == data


async def _cut(stream: trio.SSLStream[trio.SocketStream]) -> None:
    """The sidecar ends this live connection: EOF or a reset, and nothing more."""
    for _ in range(1000):
        try:
            data = await stream.receive_some(65536)
        except (trio.BrokenResourceError, ssl.SSLError):
            return
        if not data:
            return
        raise AssertionError(f"denied connection still received {data!r}")


async def test_a_deny_is_enforced_while_the_state_dir_is_full(world: World) -> None:
    with trio.fail_after(30):
        peer = world.peer_context(API)
        live = await tls_connect(world.inbound, peer)
        await _echo(live, b"allowed")
        before = world.feed_version()
        world.fs.fill()
        version = world.authority.deny(API, WEB)
        # The deny is in force at once, although feed.json could not be written.
        await _cut(live)
        await trio.aclose_forcefully(live)
        await expect_refused(await tls_connect(world.inbound, peer))
        [failed] = await world.log.wait_for("state_write_failed", what="feed")
        assert world.sidecar.policy.version == version
        assert failed["reason"] == "storage_unavailable" and failed["errno"] == "ENOSPC"
        assert world.feed_version() == before  # the old state stays whole on disk
        assert world.fs.stray_temps() == []
        status, body = await world.readyz()
        assert status == 200 and "storage_unavailable" in body and "feed (ENOSPC)" in body
        assert metric(world.sidecar, "meshid_state_dir_writable") == 0
        assert metric(world.sidecar, "meshid_state_write_failures_total", what="feed") >= 1

        world.fs.free()
        await world.log.wait_for("state_write_recovered", what="feed")
        assert world.feed_version() == version
        assert await world.readyz() == (200, "ready\n")
        assert metric(world.sidecar, "meshid_state_dir_writable") == 1
    assert world.log.find("decision", decision="deny", reason="not_allowed")


async def test_a_read_only_state_dir_is_borne_the_same_way(world: World) -> None:
    with trio.fail_after(30):
        peer = world.peer_context(API)
        world.fs.read_only()
        try:
            version = world.authority.deny(API, WEB)
            [failed] = await world.log.wait_for("state_write_failed", what="feed")
            assert failed["errno"] == "EROFS"
            assert world.sidecar.policy.version == version
            await expect_refused(await tls_connect(world.inbound, peer))
            assert (await world.readyz())[0] == 200
        finally:
            world.fs.read_write()
        await world.log.wait_for("state_write_recovered", what="feed")
        assert world.feed_version() == version


async def test_a_renewal_while_the_disk_is_full_is_used_and_saved_later(world: World) -> None:
    with trio.fail_after(30):
        old_serial, _ = world.on_disk()
        world.fs.fill()
        await world.dynamic.renew()  # what the renewal loop runs at half-life
        svid = world.sidecar.current_svid()
        assert svid is not None and svid.serial != old_serial  # in force from memory
        [failed] = await world.log.wait_for("state_write_failed", what="identity")
        assert failed["errno"] == "ENOSPC" and failed["reason"] == "storage_unavailable"
        # A restart now would find the old pair, whole: never the new key with the old cert.
        assert world.on_disk()[0] == old_serial
        assert world.fs.stray_temps() == []
        # Nothing secret in the log line.
        assert "PRIVATE" not in json.dumps(failed)
        # Peers are served with the new SVID.
        live = await tls_connect(world.inbound, world.peer_context(API))
        await _echo(live, b"new svid")
        presented = live.getpeercert(binary_form=True)
        await trio.aclose_forcefully(live)
        assert presented is not None
        # The control plane hears from us with the SVID in memory: a second renewal works
        # even though the copy on disk is older.
        await world.dynamic.renew()
        newest = world.sidecar.current_svid()
        assert newest is not None and newest.serial not in (old_serial, svid.serial)

        world.fs.free()
        await world.log.wait_for("state_write_recovered", what="identity")
        assert world.on_disk()[0] == newest.serial  # what is current, not what first failed
    assert metric(world.sidecar, "meshid_state_write_failures_total", what="identity") >= 1


async def test_control_plane_calls_do_not_read_the_state_dir(world: World) -> None:
    """An outsider (or a failing disk) took the files away: renewal still works, then rewrites."""
    with trio.fail_after(30):
        for name in ("svid.key", "svid.pem"):
            (world.state / name).unlink()
        await world.dynamic.renew()
        serial = world.sidecar.current_svid()
        assert serial is not None
        await world.dynamic.state.wait_saved()
        assert world.on_disk()[0] == serial.serial


async def test_a_restart_on_a_full_disk_finds_the_old_pair_and_serves(world: World) -> None:
    with trio.fail_after(30):
        old_serial, _ = world.on_disk()
        world.fs.fill()
        await world.dynamic.renew()
        await world.log.wait_for("state_write_failed", what="identity")
        await world.restart()  # the join token is spent: only the persisted pair can serve
        [restored] = world.log.find("credentials", how="restored")
        assert restored["serial"] == f"{old_serial:x}"
        live = await tls_connect(world.inbound, world.peer_context(API))
        await _echo(live, b"restored")
        await trio.aclose_forcefully(live)
        assert (await world.readyz())[0] == 200


async def test_a_malformed_renewal_reply_is_a_protocol_error(world: World) -> None:
    svid = world.sidecar.current_svid()
    assert svid is not None
    pem = b"".join(c.public_bytes(Encoding.PEM) for c in svid.chain).decode()
    reply = {"svid": pem, "bundle_sequence": ["x"]}  # a list where a number belongs
    with pytest.raises(ControlPlaneError) as info:
        world.dynamic._svid_from(reply, generate_key())
    assert info.value.reason == "authority_protocol"


async def test_a_new_bundle_is_trusted_while_the_disk_is_full(world: World) -> None:
    with trio.fail_after(30):
        before = (world.state / "bundle.pem").read_bytes()
        world.fs.fill()
        world.authority.rotate(timedelta(hours=1), wait_for_acks=False)
        await world.log.wait_for("credentials", how="bundle_updated")
        [failed] = await world.log.wait_for("state_write_failed", what="bundle")
        assert failed["errno"] == "ENOSPC"
        svid = world.sidecar.current_svid()
        assert svid is not None and len(svid.bundle.roots) == 2  # in force from memory
        assert (world.state / "bundle.pem").read_bytes() == before
        world.fs.free()
        await world.log.wait_for("state_write_recovered", what="bundle")
        assert (world.state / "bundle.pem").read_bytes() == svid.bundle.to_pem()


async def test_an_enrollment_on_a_full_disk_serves_and_is_saved_later(world: World) -> None:
    with trio.fail_after(30):
        world.fs.fill()
        db, log = await world.enroll_another("db")  # the token is spent now
        [failed] = log.find("state_write_failed", what="identity")
        assert failed["errno"] == "ENOSPC" and failed["operation"] == "write"
        assert db.current_svid() is not None and db.ready
        assert db.dynamic is not None and not db.dynamic.state.writable
        world.fs.free()
        await log.wait_for("state_write_recovered", what="identity")
        svid = db.current_svid()
        assert svid is not None
        key = key_from_pem((world.fs.root / "db" / "svid.key").read_bytes(), None)
        assert public_key_matches(key, svid.leaf)


def _answering(doc: dict[str, Any]) -> Any:
    """A control plane client that answers every request with `doc` (a stream of it alone,
    to a watch that takes a stream)."""

    async def request(*args: Any, each: Any = None, **kwargs: Any) -> dict[str, Any]:
        if each is not None:
            await each(doc)
        return doc

    return request


async def test_a_feed_from_an_authority_before_wire_versions_is_applied(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = SpiffeId(TD, "/other")
    world.authority.allow(other, WEB)
    old = world.authority.feed(WEB)  # the shape authorities sent before `v`
    assert "v" not in old
    monkeypatch.setattr(world.dynamic.client, "request", _answering({**old, "extra": [1]}))
    with trio.fail_after(10):
        await world.dynamic._poll_feed(WatchQuery(wait=0), 5.0)
    assert world.sidecar.current_policy().decide(other, WEB).allowed


async def test_a_malformed_feed_is_a_protocol_error_naming_the_field(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = world.sidecar.current_policy()
    feed = {**world.authority.feed(WEB), "policy_version": 99, "revoked": "everyone"}
    monkeypatch.setattr(world.dynamic.client, "request", _answering(feed))
    with pytest.raises(ControlPlaneError) as info:
        await world.dynamic._poll_feed(WatchQuery(wait=0), 5.0)
    assert info.value.reason == "authority_protocol"
    assert "revoked: must be a list" in info.value.message
    assert world.sidecar.current_policy() is before
