"""Hostile peers, in both directions, each next to the good peer it imitates.

Inbound: a client with a certificate of its own making talks TLS 1.3 straight
to api's mTLS port. Outbound: web's app asks for api, and the upstream at
that address is an impostor with the certificate under test. Every refusal
must name its reason in the decision log and the metrics, let no byte through,
and leave the sidecar serving the next good connection.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
import trio
from sidecar_helpers import (
    API,
    TD,
    WEB,
    Backend,
    Creds,
    ForeignCa,
    TlsUpstream,
    client_context,
    connect,
    expect_refused,
    metric,
    receive_all,
    server_context,
    sid,
    tls_connect,
    utcnow,
    wait_cut,
)
from sidecar_mesh import Mesh, Pki

from meshid.clock import ManualClock
from meshid.spiffeid import TrustDomain

EVIL = TrustDomain("evil.example")


def _expired(pki: Pki, name: str) -> Creds:
    now = utcnow()
    return pki.forge(
        sid(name), not_before=now - timedelta(hours=2), not_after=now - timedelta(hours=1)
    )


def _not_yet_valid(pki: Pki, name: str) -> Creds:
    now = utcnow()
    return pki.forge(
        sid(name), not_before=now + timedelta(hours=1), not_after=now + timedelta(hours=2)
    )


# name -> (how to make the certificate the peer presents, the reason the sidecar must give)
HOSTILE: dict[str, tuple[Callable[[Pki, str], Creds | None], str]] = {
    "another_valid_id": (lambda pki, _: pki.issue("mallory"), "not_allowed"),
    "foreign_trust_domain": (
        lambda _, name: ForeignCa.create(EVIL).issue(name),
        "untrusted_trust_domain",
    ),
    "foreign_ca_same_trust_domain": (
        lambda _, name: ForeignCa.create(TD).issue(name),
        "untrusted_certificate",
    ),
    "no_certificate": (lambda _, __: None, "no_client_certificate"),
    "expired": (_expired, "expired"),
    "not_yet_valid": (_not_yet_valid, "not_yet_valid"),
    "two_uri_sans": (lambda pki, name: pki.forge(sid(name), sid("other")), "invalid_svid"),
    "ca_certificate_as_leaf": (lambda pki, name: pki.forge(sid(name), ca=True), "invalid_svid"),
    "root_as_leaf": (lambda pki, _: Creds((pki.root,), pki.root_key), "invalid_svid"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
async def test_inbound_refuses_hostile_client(
    case: str, mesh: Mesh, backend: Backend, pki: Pki, tmp_path: Path
) -> None:
    make, reason = HOSTILE[case]
    api = await mesh.start("api", forward=backend.addr, allow=[("web", "api")])
    hostile = client_context(tmp_path, pki.bundle_pem, make(pki, "web"))
    good = client_context(tmp_path, pki.bundle_pem, pki.issue("web"))
    with trio.fail_after(20):
        await expect_refused(await tls_connect(api.inbound, hostile))
        [deny] = await api.log.wait_for("decision", decision="deny")
        assert backend.accepted == 0
        # The sidecar survives and serves the next good client.
        stream = await tls_connect(api.inbound, good)
        async with stream:
            await stream.send_all(b"ping")
            assert await stream.receive_some(100) == b"ping"
        [allow] = await api.log.wait_for("decision", decision="allow")
    assert deny["reason"] == reason, deny
    assert deny["direction"] == "inbound"
    assert allow["peer_id"] == WEB
    assert backend.accepted == 1
    sc = api.sidecar
    assert metric(sc, "meshid_connections_total", decision="deny", reason=reason) == 1
    assert metric(sc, "meshid_handshake_failures_total", direction="inbound", reason=reason) == 1
    assert metric(sc, "meshid_connections_total", decision="allow", reason="allowed") == 1


# What the outbound side must say about an upstream with the same certificates.
OUTBOUND_REASON = {
    case: ("wrong_identity" if case == "another_valid_id" else reason)
    for case, (_, reason) in HOSTILE.items()
    if case != "no_certificate"  # a TLS 1.3 server always presents a certificate
}


@pytest.mark.parametrize("case", sorted(OUTBOUND_REASON))
async def test_outbound_refuses_hostile_upstream(
    case: str, mesh: Mesh, nursery: trio.Nursery, pki: Pki, tmp_path: Path
) -> None:
    make, _ = HOSTILE[case]
    reason = OUTBOUND_REASON[case]
    creds = make(pki, "api")
    assert creds is not None
    impostor = TlsUpstream(server_context(tmp_path, creds))
    genuine = TlsUpstream(server_context(tmp_path, pki.issue("api")))
    await nursery.start(impostor.serve)
    await nursery.start(genuine.serve)
    web = await mesh.start(
        "web", outbound=[("api", impostor.addr), ("api", genuine.addr)], allow=[("web", "api")]
    )
    with trio.fail_after(20):
        stream = await connect(web.outbound(0))
        async with stream:
            await stream.send_all(b"secret for api")
            assert await wait_cut(stream) == b""
        [deny] = await web.log.wait_for("decision", decision="deny")
        # The same sidecar still reaches the genuine api.
        stream = await connect(web.outbound(1))
        async with stream:
            assert await receive_all(stream) == b"upstream says hi"
        [allow] = await web.log.wait_for("decision", decision="allow")
    assert deny["reason"] == reason, deny
    assert deny["direction"] == "outbound"
    assert impostor.accepted == 1
    assert allow["peer_id"] == API
    assert genuine.completed == 1
    sc = web.sidecar
    assert metric(sc, "meshid_connections_total", decision="deny", reason=reason) == 1
    assert metric(sc, "meshid_handshake_failures_total", direction="outbound", reason=reason) == 1


async def test_clock_skew_tolerance_is_the_twin_of_not_yet_valid(
    mesh: Mesh, backend: Backend, pki: Pki, nursery: trio.Nursery, tmp_path: Path
) -> None:
    """A leaf that starts 20 s from now is within the default 60 s skew: accepted both ways."""
    now = utcnow()
    start, end = now + timedelta(seconds=20), now + timedelta(hours=1)
    early_api = pki.forge(sid("api"), not_before=start, not_after=end)
    early_web = pki.forge(sid("web"), not_before=start, not_after=end)
    upstream = TlsUpstream(server_context(tmp_path, early_api))
    await nursery.start(upstream.serve)
    api = await mesh.start("api", forward=backend.addr, allow=[("web", "api")])
    web = await mesh.start("web", outbound=[("api", upstream.addr)], allow=[("web", "api")])
    client = client_context(tmp_path, pki.bundle_pem, early_web)
    with trio.fail_after(20):
        stream = await tls_connect(api.inbound, client)
        async with stream:
            await stream.send_all(b"early")
            assert await stream.receive_some(100) == b"early"
        stream_out = await connect(web.outbound())
        async with stream_out:
            assert await receive_all(stream_out) == b"upstream says hi"
        [inbound] = await api.log.wait_for("decision")
        [outbound] = await web.log.wait_for("decision")
    assert (inbound["decision"], inbound["reason"]) == ("allow", "allowed")
    assert (outbound["decision"], outbound["reason"]) == ("allow", "allowed")


async def test_tls_below_1_3_and_an_abrupt_client_are_refused(
    mesh: Mesh, backend: Backend, pki: Pki, tmp_path: Path
) -> None:
    api = await mesh.start("api", forward=backend.addr, allow=[("web", "api")])
    old = client_context(tmp_path, pki.bundle_pem, pki.issue("web"))
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    with trio.fail_after(20):
        await expect_refused(await tls_connect(api.inbound, old))
        abrupt = await connect(api.inbound)
        await abrupt.aclose()  # connects and hangs up before saying anything
        denies = await api.log.wait_for("decision", decision="deny", count=2)
        good = client_context(tmp_path, pki.bundle_pem, pki.issue("web"))
        stream = await tls_connect(api.inbound, good)
        async with stream:
            await stream.send_all(b"ping")
            assert await stream.receive_some(100) == b"ping"
    assert [d["reason"] for d in denies] == ["tls_version", "connection_closed"]
    assert backend.accepted == 1


async def test_peer_certificate_expiring_mid_connection_is_cut(
    mesh: Mesh, backend: Backend, pki: Pki, tmp_path: Path
) -> None:
    api = await mesh.start("api", forward=backend.addr, allow=[("web", "api")])
    now = utcnow()
    short = pki.forge(sid("web"), not_after=now + timedelta(seconds=3))
    expiring = client_context(tmp_path, pki.bundle_pem, short)
    lasting = client_context(tmp_path, pki.bundle_pem, pki.issue("web"))
    with trio.fail_after(20):
        doomed = await tls_connect(api.inbound, expiring)
        steady = await tls_connect(api.inbound, lasting)
        async with steady:
            for stream in (doomed, steady):
                await stream.send_all(b"hi")
                assert await stream.receive_some(100) == b"hi"
            try:
                assert await wait_cut(doomed) == b""  # cut once its certificate expires
            finally:
                await trio.aclose_forcefully(doomed)
            [close] = await api.log.wait_for("close")
            await steady.send_all(b"still")
            assert await steady.receive_some(100) == b"still"
    [doomed_allow] = api.log.find("decision", peer_serial=short.serial)
    assert close["reason"] == "peer_certificate_expired"
    assert close["conn_id"] == doomed_allow["conn_id"]
    assert utcnow() > short.chain[0].not_valid_after_utc
    reason = "peer_certificate_expired"
    assert metric(api.sidecar, "meshid_connections_closed_total", reason=reason) == 1


async def test_an_injected_clock_governs_peer_validity_on_the_mtls_port(
    mesh: Mesh, backend: Backend, pki: Pki, tmp_path: Path
) -> None:
    """Expiry and not-yet-valid follow the sidecar's clock, not OpenSSL's: moved by hand."""
    start = utcnow()
    clock = ManualClock(start)
    api = await mesh.start("api", forward=backend.addr, allow=[("web", "api")], clock=clock)
    # Valid only from ten minutes on: on the real clock OpenSSL would refuse it.
    later = pki.forge(
        sid("web"),
        not_before=start + timedelta(minutes=10),
        not_after=start + timedelta(minutes=20),
    )
    client = client_context(tmp_path, pki.bundle_pem, later)
    with trio.fail_after(20):
        await expect_refused(await tls_connect(api.inbound, client))
        [early] = await api.log.wait_for("decision", decision="deny")
        clock.advance(11 * 60)  # now inside its validity
        stream = await tls_connect(api.inbound, client)
        await stream.send_all(b"on time")
        assert await stream.receive_some(100) == b"on time"
        clock.advance(10 * 60)  # now past its NotAfter: the sweep cuts the live connection
        try:
            assert await wait_cut(stream) == b""
        finally:
            await trio.aclose_forcefully(stream)
        [close] = await api.log.wait_for("close")
        fresh = client_context(tmp_path, pki.bundle_pem, later)  # no session to resume
        await expect_refused(await tls_connect(api.inbound, fresh))
        [_, late] = await api.log.wait_for("decision", decision="deny", count=2)
    assert early["reason"] == "not_yet_valid"
    assert close["reason"] == "peer_certificate_expired"
    assert late["reason"] == "expired"
    assert utcnow() < start + timedelta(minutes=10)  # no real time passed for any of it
