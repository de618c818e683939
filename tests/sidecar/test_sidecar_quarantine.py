"""Quarantine keys on what a peer proved.

Refusals before authentication count against the source address, with a high
bar (peers share addresses behind a NAT); refusals of a peer that completed
its handshake count against its SPIFFE ID. A client that presents someone
else's certificate without the key must never get that someone quarantined,
and a resumed session meets the same quarantine as a full handshake.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from pathlib import Path
from typing import Any

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL, crypto
from OpenSSL._util import lib as ssl_lib
from sidecar_helpers import (
    API,
    WEB,
    Addr,
    Backend,
    client_context,
    connect,
    metric,
    refused_roundtrip,
    roundtrip,
    sid,
    tls_connect,
    wait_cut,
)
from sidecar_mesh import Mesh, Pki, start_pair

from meshid.svid import generate_key
from sidecar.config import Limits
from sidecar.quarantine import ADDRESS, SPIFFE_ID, Quarantine, charged_to

OLD_THRESHOLD = Limits().quarantine_failures  # what a single address could do before
ATTEMPTS = OLD_THRESHOLD + 5

# -- the rules, pure --------------------------------------------------------------


@pytest.mark.parametrize(
    ("reason", "proved", "kind"),
    [
        ("not_allowed", True, SPIFFE_ID),
        ("identity_revoked", True, SPIFFE_ID),
        ("wrong_identity", True, SPIFFE_ID),
        # refused inside the handshake: the key was never shown
        ("not_allowed", False, ADDRESS),
        ("identity_revoked", False, ADDRESS),
        ("not_tls", False, ADDRESS),
        ("handshake_timeout", False, ADDRESS),
        ("untrusted_certificate", False, ADDRESS),
        ("expired", True, ADDRESS),  # a broken certificate says nothing about an ID
        ("tls_error", False, ADDRESS),
        ("peer_quarantined", True, None),
        ("connection_limit", False, None),
        ("internal_error", False, None),
    ],
)
def test_what_a_refusal_is_charged_to(reason: str, proved: bool, kind: str | None) -> None:
    assert charged_to(reason, proved=proved) == kind


def test_quarantine_thresholds_are_per_kind() -> None:
    q = Quarantine(identity_failures=2, address_failures=5, window=60, block=300)
    web = str(WEB)
    for now in (1.0, 2.0):
        tipped = q.refused("not_allowed", proved=True, identity=web, address="10.0.0.1", now=now)
    assert tipped is not None and (tipped.kind, tipped.key) == (SPIFFE_ID, web)
    assert q.blocked(SPIFFE_ID, web, 3.0)
    assert not q.blocked(ADDRESS, "10.0.0.1", 3.0)
    # unproven claims of the same ID: the address pays, the ID's count does not move
    for i in range(4):
        assert (
            q.refused("not_allowed", proved=False, identity=str(API), address="10.0.0.2", now=i)
            is None
        )
    assert not q.blocked(SPIFFE_ID, str(API), 5.0)
    tipped = q.refused("not_tls", proved=False, identity=None, address="10.0.0.2", now=5.0)
    assert tipped is not None and (tipped.kind, tipped.key) == (ADDRESS, "10.0.0.2")
    assert set(q.active(6.0)) == {web, "10.0.0.2"}
    assert not q.blocked(ADDRESS, "10.0.0.2", 5.0 + 300)
    off = Quarantine(identity_failures=0, address_failures=0, window=60, block=300)
    assert off.refused("not_tls", proved=False, identity=None, address="x", now=0) is None


# -- clients ------------------------------------------------------------------------


def keyless_context(cert: x509.Certificate) -> SSL.Context:
    """A TLS 1.3 client context that presents `cert` but signs with an unrelated key.

    OpenSSL refuses to pair a certificate with a key that does not match, so
    the certificate's public key is swapped while the key is loaded, and then
    swapped back: what goes on the wire is the original certificate, byte for
    byte, and CertificateVerify is made with the wrong key.
    """
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    leaf = crypto.X509.from_cryptography(cert)
    impostor = crypto.PKey.from_cryptography_key(generate_key())
    owner = crypto.PKey.from_cryptography_key(cert.public_key())
    raw: Any = leaf._x509
    raw_ctx: Any = ctx._context
    assert ssl_lib.SSL_CTX_use_certificate(raw_ctx, raw) == 1  # keeps this object, no copy
    assert ssl_lib.X509_set_pubkey(raw, impostor._pkey) == 1
    assert ssl_lib.SSL_CTX_use_PrivateKey(raw_ctx, impostor._pkey) == 1
    assert ssl_lib.X509_set_pubkey(raw, owner._pkey) == 1
    assert crypto.dump_certificate(crypto.FILETYPE_ASN1, leaf) == cert.public_bytes(Encoding.DER)
    return ctx


def attempt(addr: Addr, ctx: SSL.Context, source: str) -> bytes:
    """One blocking TLS connection from `source`; what the server sent back (b"" if refused)."""
    sock = socket.socket()
    # kernel timeouts, so that the socket stays blocking for pyOpenSSL
    timeout = struct.pack("ll", 10, 0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeout)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeout)
    try:
        sock.bind((source, 0))
        sock.connect(addr)
        conn = SSL.Connection(ctx, sock)
        conn.set_connect_state()
        conn.do_handshake()
        conn.sendall(b"let me in")
        return conn.recv(100)
    except (SSL.Error, OSError):
        return b""
    finally:
        sock.close()


async def junk(addr: Addr, source: str = "127.0.0.1") -> None:
    sock = trio.socket.socket()
    await sock.bind((source, 0))
    await sock.connect(addr)
    stream = trio.SocketStream(sock)
    async with stream:
        with contextlib.suppress(trio.BrokenResourceError):
            await stream.send_all(b"GET / HTTP/1.1\r\nHost: api\r\n\r\n" + b"\x00" * 64)
        await wait_cut(stream)


# -- through real sidecars ----------------------------------------------------------


async def test_junk_from_an_address_does_not_lock_out_peers_behind_it(
    mesh: Mesh, backend: Backend
) -> None:
    pair = await start_pair(mesh, backend)  # default limits
    with trio.fail_after(30):
        for _ in range(ATTEMPTS):
            await junk(pair.api.inbound)
        await pair.api.log.wait_for("decision", decision="deny", count=ATTEMPTS)
        # web's sidecar connects from the same address, 127.0.0.1
        assert await roundtrip(pair.app, b"still welcome") == b"still welcome"
    assert not pair.api.log.find("peer_quarantined")
    assert not pair.api.log.find("decision", reason="peer_quarantined")


async def test_an_address_is_quarantined_at_its_own_threshold(mesh: Mesh, backend: Backend) -> None:
    pair = await start_pair(mesh, backend, api_limits={"quarantine_address_failures": 3})
    with trio.fail_after(30):
        for _ in range(3):
            await junk(pair.api.inbound, "127.0.0.2")
        [tipped] = await pair.api.log.wait_for("peer_quarantined")
        await junk(pair.api.inbound, "127.0.0.2")
        [blocked] = await pair.api.log.wait_for("decision", reason="peer_quarantined")
        assert await roundtrip(pair.app, b"other address") == b"other address"
    assert (tipped["kind"], tipped["peer"], tipped["failures"]) == ("address", "127.0.0.2", 3)
    assert blocked["peer_addr"].startswith("127.0.0.2:")
    assert metric(pair.api.sidecar, "meshid_peer_quarantines_total", kind="address") == 1


@pytest.mark.parametrize("claimed", ["web", "mallory"])
async def test_a_certificate_without_its_key_does_not_quarantine_its_owner(
    claimed: str, mesh: Mesh, backend: Backend, pki: Pki, tmp_path: Path
) -> None:
    """Someone replays a real SVID's certificate with a key of their own, many times.

    `web` is allowed (the callback says yes, CertificateVerify then fails);
    `mallory` is not allowed yet (the callback refuses, before any key was
    shown). Either way the owner, from the same address, gets in afterwards.
    """
    real = pki.issue(claimed)
    api = await mesh.start("api", forward=backend.addr, allow=[("web", "api")])
    ctx = keyless_context(real.chain[0])
    with trio.fail_after(60):
        for _ in range(ATTEMPTS):
            got = await trio.to_thread.run_sync(attempt, api.inbound, ctx, "127.0.0.1")
            assert got == b""
        denials = await api.log.wait_for("decision", decision="deny", count=ATTEMPTS)
        if claimed == "mallory":
            api.write_policy([("web", "api"), ("mallory", "api")])
            await api.log.wait_for("policy", version=2)
        owner = await tls_connect(api.inbound, client_context(tmp_path, pki.bundle_pem, real))
        async with owner:
            await owner.send_all(b"it is me")
            assert await owner.receive_some(100) == b"it is me"
    assert not api.log.find("peer_quarantined")
    assert {d["reason"] for d in denials} == {
        "key_not_proved" if claimed == "web" else "not_allowed"
    }
    [allowed] = api.log.find("decision", decision="allow")
    assert allowed["peer_id"] == sid(claimed)


async def test_a_resumed_session_meets_the_quarantine_of_its_id(
    mesh: Mesh, backend: Backend
) -> None:
    """Resumed sessions skip the verify callback; judgement and quarantine must not be skipped."""
    pair = await start_pair(mesh, backend, api_limits={"quarantine_failures": 2})
    api = pair.api
    with trio.fail_after(30):
        # Two connections at once, two full handshakes: web keeps two sessions, each
        # offered once (TLS 1.3 tickets are single use).
        async with trio.open_nursery() as nursery:
            for n in range(2):
                nursery.start_soon(roundtrip, pair.app, b"first %d" % n)
        await pair.web.log.wait_for("close", count=2)
        api.write_policy([])
        await api.log.wait_for("policy", version=2)
        for _ in range(2):  # resumed, so proven: each refusal is charged to web's ID
            assert await refused_roundtrip(pair.app) == b""
        [tipped] = await api.log.wait_for("peer_quarantined")
        api.write_policy([("web", "api")])
        await api.log.wait_for("policy", version=3)
        assert await refused_roundtrip(pair.app) == b""  # allowed again, but quarantined
        [blocked] = await api.log.wait_for("decision", reason="peer_quarantined")
    assert (tipped["kind"], tipped["peer"], tipped["last_reason"]) == (
        "spiffe_id",
        WEB,
        "not_allowed",
    )
    assert blocked["peer_id"] == WEB
    assert [d["reason"] for d in api.log.find("decision", decision="deny")] == [
        "not_allowed",
        "not_allowed",
        "peer_quarantined",
    ]
    assert [d["resumed"] for d in api.log.find("decision", decision="deny")] == [True, True, False]
    assert backend.accepted == 2


async def test_a_quarantined_id_is_refused_on_a_full_handshake_too(
    mesh: Mesh, backend: Backend, pki: Pki, tmp_path: Path
) -> None:
    api = await mesh.start("api", forward=backend.addr, allow=[("web", "api")])
    for _ in range(api.sidecar.limits.quarantine_failures):
        api.sidecar.quarantine.refused(
            "not_allowed", proved=True, identity=WEB, address="10.9.9.9", now=trio.current_time()
        )
    ctx = client_context(tmp_path, pki.bundle_pem, pki.issue("web"))
    with trio.fail_after(20):
        stream = await tls_connect(api.inbound, ctx)
        async with stream:
            with contextlib.suppress(trio.BrokenResourceError):
                await stream.send_all(b"x")
            assert await wait_cut(stream) == b""
        [blocked] = await api.log.wait_for("decision", reason="peer_quarantined")
        other = await connect(api.inbound)  # the address itself is not blocked
        await other.aclose()
    assert blocked["peer_id"] == WEB
    assert backend.accepted == 0
