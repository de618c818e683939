"""Resumed TLS sessions: they really happen, and they are judged exactly like full handshakes.

Inbound, a client keeps the ticket the sidecar gave it and offers it again
(the stdlib client here says whether OpenSSL resumed); outbound, the sidecar
offers a session from its own cache. After each change that would refuse a
full handshake (the pair denied, the peer revoked by ID or by serial, the
root rolled over, the clock past the peer's expiry) the connection that
offers the old session is refused with the reason a full handshake gets.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
import trio
from sidecar_helpers import (
    API,
    TD,
    WEB,
    Addr,
    Backend,
    Creds,
    ForeignCa,
    client_context,
    connect,
    receive_exactly,
    refused_roundtrip,
    roundtrip,
    utcnow,
)
from sidecar_mesh import Mesh, Pki, Running

from meshid.bundle import TrustBundle
from meshid.clock import ManualClock
from meshid.policy import Policy
from meshid.spiffeid import SpiffeId
from meshid.svid import certs_to_pem
from sidecar.credentials import TICKET_KEY_LIFETIME, Svid

LIMITS = {"quarantine_failures": 0}  # refusals here are the point: never quarantine
PAIR = (SpiffeId.parse(WEB), SpiffeId.parse(API))


@dataclass
class Attempt:
    reused: bool
    echoed: bytes
    session: ssl.SSLSession | None


def attempt(addr: Addr, ctx: ssl.SSLContext, session: ssl.SSLSession | None) -> Attempt:
    """One blocking TLS connection (run in a thread): send a line, read the echo, if any."""
    with (
        socket.create_connection(addr, timeout=10) as raw,
        ctx.wrap_socket(raw, session=session) as tls,
    ):
        reused = tls.session_reused
        echoed = b""
        try:
            tls.sendall(b"ping")
            while len(echoed) < 4:
                chunk = tls.recv(4 - len(echoed))
                if not chunk:
                    break
                echoed += chunk
        except (ssl.SSLError, OSError):
            pass  # refused: an alert or a reset instead of the echo
        return Attempt(reused, echoed, tls.session if echoed else None)


async def connect_and_keep(addr: Addr, ctx: ssl.SSLContext) -> ssl.SSLSession:
    """A first, full handshake that is allowed; its ticket, for the next connection."""
    first = await trio.to_thread.run_sync(attempt, addr, ctx, None)
    assert (first.reused, first.echoed) == (False, b"ping")
    assert first.session is not None and first.session.has_ticket
    return first.session


async def test_an_inbound_peer_resumes_with_its_ticket(
    mesh: Mesh, backend: Backend, pki: Pki, tmp_path: Path
) -> None:
    api = await mesh.start("api", forward=backend.addr, allow=[("web", "api")])
    ctx = client_context(tmp_path, pki.bundle_pem, pki.issue("web"))
    with trio.fail_after(20):
        session = await connect_and_keep(api.inbound, ctx)
        again = await trio.to_thread.run_sync(attempt, api.inbound, ctx, session)
        allowed = await api.log.wait_for("decision", decision="allow", count=2)
    assert (again.reused, again.echoed) == (True, b"ping")
    assert [(a["peer_id"], a["resumed"]) for a in allowed] == [(WEB, False), (WEB, True)]


async def test_inbound_ticket_keys_rotate(
    mesh: Mesh, backend: Backend, pki: Pki, tmp_path: Path
) -> None:
    """A ticket sealed before the keys rotated is not resumed; the next one is."""
    clock = ManualClock()
    api = await mesh.start("api", forward=backend.addr, allow=[("web", "api")], clock=clock)
    ctx = client_context(tmp_path, pki.bundle_pem, pki.issue("web"))
    with trio.fail_after(20):
        session = await connect_and_keep(api.inbound, ctx)
        clock.advance(TICKET_KEY_LIFETIME - 1)
        before = await trio.to_thread.run_sync(attempt, api.inbound, ctx, session)
        assert before.session is not None
        clock.advance(1)
        after = await trio.to_thread.run_sync(attempt, api.inbound, ctx, before.session)
        assert after.session is not None
        again = await trio.to_thread.run_sync(attempt, api.inbound, ctx, after.session)
        allowed = await api.log.wait_for("decision", decision="allow", count=4)
    assert [a.reused for a in (before, after, again)] == [True, False, True]
    assert [a.echoed for a in (before, after, again)] == [b"ping"] * 3
    assert [a["resumed"] for a in allowed] == [False, True, False, True]


def _deny(api: Running, creds: Creds, new: ForeignCa) -> None:
    api.sidecar.install_policy(Policy.build([], version=2))


def _revoke_id(api: Running, creds: Creds, new: ForeignCa) -> None:
    api.sidecar.install_policy(Policy.build([PAIR], version=2, revoked=[PAIR[0]]))


def _revoke_serial(api: Running, creds: Creds, new: ForeignCa) -> None:
    serial = creds.chain[0].serial_number
    api.sidecar.install_policy(Policy.build([PAIR], version=2, revoked_serials=[serial]))


def _roll_root(api: Running, creds: Creds, new: ForeignCa) -> None:
    """api moves to a new root and drops the old anchor (web still holds an old-root SVID)."""
    mine = new.issue("api")
    bundle = TrustBundle(TD, (new.root,))
    svid = Svid.check(list(mine.chain), mine.key, bundle, SpiffeId.parse(API), utcnow())
    api.sidecar.install_svid(svid, "rollover")


def _expire(api: Running, creds: Creds, new: ForeignCa) -> None:
    clock = api.sidecar.clock
    assert isinstance(clock, ManualClock)
    clock.advance(timedelta(minutes=11))  # web's SVID lives 10 minutes


Change = Callable[[Running, Creds, ForeignCa], None]


@pytest.mark.parametrize(
    ("change", "reason", "resumes"),
    [
        (_deny, "not_allowed", True),
        (_revoke_id, "identity_revoked", True),
        (_revoke_serial, "identity_revoked", True),
        # A new root is a new credential generation: its server context has new
        # ticket keys, so OpenSSL cannot even decrypt the old ticket.
        (_roll_root, "untrusted_certificate", False),
        (_expire, "expired", True),
    ],
    ids=["deny", "revoke_id", "revoke_serial", "roll_root", "expire"],
)
async def test_an_inbound_resumed_session_is_refused_like_a_full_handshake(
    mesh: Mesh,
    backend: Backend,
    pki: Pki,
    tmp_path: Path,
    change: Change,
    reason: str,
    resumes: bool,
) -> None:
    api = await mesh.start(
        "api", forward=backend.addr, allow=[("web", "api")], limits=LIMITS, clock=ManualClock()
    )
    web = pki.issue("web", ttl=timedelta(minutes=10))
    new = ForeignCa.create(TD)  # the next root, should the change roll over to it
    # The client trusts api's certificate before and after the change, so that
    # only api's judgement of web decides.
    ctx = client_context(tmp_path, pki.bundle_pem + certs_to_pem([new.root]), web)
    with trio.fail_after(20):
        session = await connect_and_keep(api.inbound, ctx)
        change(api, web, new)
        resumed = await trio.to_thread.run_sync(attempt, api.inbound, ctx, session)
        full = await trio.to_thread.run_sync(attempt, api.inbound, ctx, None)
        denied = await api.log.wait_for("decision", decision="deny", count=2)
    assert resumed.reused is resumes
    assert (resumed.echoed, full.reused, full.echoed) == (b"", False, b"")
    assert [d["reason"] for d in denied] == [reason, reason], denied
    if resumes:
        assert denied[0]["resumed"] is True
    assert backend.accepted == 1


async def _outbound_pair(mesh: Mesh, backend: Backend, pki: Pki) -> tuple[Running, Running]:
    api = await mesh.start(
        "api",
        forward=backend.addr,
        allow=[("web", "api")],
        limits=LIMITS,
        creds=pki.issue("api", ttl=timedelta(minutes=4)),
    )
    web = await mesh.start(
        "web",
        outbound=[("api", api.inbound)],
        allow=[("web", "api")],
        limits=LIMITS,
        clock=ManualClock(),
    )
    return web, api


async def test_an_outbound_connection_resumes_from_the_cache(
    mesh: Mesh, backend: Backend, pki: Pki
) -> None:
    web, api = await _outbound_pair(mesh, backend, pki)
    with trio.fail_after(20):
        for n in range(3):
            assert await roundtrip(web.outbound(), b"hello %d" % n) == b"hello %d" % n
        out = await web.log.wait_for("decision", decision="allow", count=3)
        inn = await api.log.wait_for("decision", decision="allow", count=3)
    assert [d["resumed"] for d in out] == [False, True, True]
    assert [d["resumed"] for d in inn] == [False, True, True]


async def test_an_outbound_cache_holds_a_session_per_concurrent_connection(
    mesh: Mesh, backend: Backend, pki: Pki
) -> None:
    """TLS 1.3 tickets are offered once each: concurrent connections need one each."""
    web, _ = await _outbound_pair(mesh, backend, pki)
    with trio.fail_after(20):

        async def burst() -> None:
            async with trio.open_nursery() as nursery:
                for n in range(4):
                    nursery.start_soon(roundtrip, web.outbound(), b"x%d" % n)

        await burst()  # four full handshakes, four sessions kept
        await web.log.wait_for("close", count=4)
        await burst()  # four resumptions, each from its own session
        out = await web.log.wait_for("decision", decision="allow", count=8)
        await web.log.wait_for("close", count=8)
    assert [d["resumed"] for d in out[4:]] == [True] * 4
    gen = web.sidecar.current.generation
    assert gen is not None and len(gen.sessions) == 4  # each used once, each replaced


def _revoke_api_serial(web: Running, api_serial: int) -> None:
    web.sidecar.install_policy(Policy.build([PAIR], version=2, revoked_serials=[api_serial]))


def _expire_api(web: Running, api_serial: int) -> None:
    clock = web.sidecar.clock
    assert isinstance(clock, ManualClock)
    # api's SVID lives 4 minutes; the cached session (resumable for 5) is still fresh
    clock.advance(timedelta(minutes=4, seconds=30))


@pytest.mark.parametrize(
    ("change", "reason"),
    [(_revoke_api_serial, "identity_revoked"), (_expire_api, "expired")],
    ids=["revoke_serial", "expire"],
)
async def test_an_outbound_resumed_session_is_refused_like_a_full_handshake(
    mesh: Mesh,
    backend: Backend,
    pki: Pki,
    change: Callable[[Running, int], None],
    reason: str,
) -> None:
    web, api = await _outbound_pair(mesh, backend, pki)
    with trio.fail_after(20):
        assert await roundtrip(web.outbound(), b"first") == b"first"
        await web.log.wait_for("close")
        gen = api.sidecar.current.generation
        assert gen is not None
        change(web, gen.svid.serial)
        for _ in range(2):  # the cached session, then (none left) a full handshake
            assert await refused_roundtrip(web.outbound()) == b""
        denied = await web.log.wait_for("decision", decision="deny", count=2)
        closes = await api.log.wait_for("close", count=2)
    assert [(d["reason"], d.get("resumed")) for d in denied] == [(reason, True), (reason, None)]
    assert all(d["peer_id"] == API for d in denied)
    # api finished the resumed handshake before web judged it, so api's app saw a
    # connection open; web refused it before sending a byte.
    assert [c["bytes_in"] for c in closes] == [5, 0]


async def test_a_long_connection_leaves_its_session_for_the_next_at_once(
    mesh: Mesh, backend: Backend, pki: Pki
) -> None:
    """The session is kept when the upstream's ticket arrives, not when the connection ends."""
    web, _ = await _outbound_pair(mesh, backend, pki)
    with trio.fail_after(20):
        long = await connect(web.outbound())
        async with long:
            await long.send_all(b"hold")
            assert await receive_exactly(long, 4) == b"hold"
            assert await roundtrip(web.outbound(), b"meanwhile") == b"meanwhile"
            out = await web.log.wait_for("decision", decision="allow", count=2)
    assert [d["resumed"] for d in out] == [False, True]


async def test_an_outbound_session_does_not_outlive_a_root_rollover(
    mesh: Mesh, backend: Backend, pki: Pki
) -> None:
    """web moves to a new root and drops the old anchor: its cached session goes with it."""
    web, _ = await _outbound_pair(mesh, backend, pki)
    with trio.fail_after(20):
        assert await roundtrip(web.outbound(), b"first") == b"first"
        await web.log.wait_for("close")
        old = web.sidecar.current.generation
        assert old is not None and len(old.sessions) == 1
        new = ForeignCa.create(TD)
        mine = new.issue("web")
        bundle = TrustBundle(TD, (new.root,))
        svid = Svid.check(list(mine.chain), mine.key, bundle, SpiffeId.parse(WEB), utcnow())
        web.sidecar.install_svid(svid, "rollover")
        assert await refused_roundtrip(web.outbound()) == b""
        [denied] = await web.log.wait_for("decision", decision="deny")
    assert denied["reason"] == "untrusted_certificate"
    assert "resumed" not in denied  # refused inside a full handshake: nothing was offered
    assert len(old.sessions) == 1  # the old generation's session was never taken
