"""What a sidecar's client offers: hybrid post-quantum key share, AES-128-GCM first.

Handshakes in memory (no sockets) between real TLS contexts built from SVIDs
of our own authority: two sidecars agree on X25519MLKEM768 with no extra
round trip, and on TLS_AES_128_GCM_SHA256; a server without ML-KEM (the
stdlib's OpenSSL here may be one) still gets a connection, after asking for
another key share, and a server that wants AES-256 gets it.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest
from OpenSSL import SSL
from sidecar_helpers import TD, server_context, utcnow
from sidecar_mesh import Pki

from meshid.bundle import TrustBundle
from meshid.spiffeid import SpiffeId
from sidecar.credentials import Generation, Svid

HYBRID = "X25519MLKEM768"
HYBRID_CODE = 0x11EC  # its TLS NamedGroup value
KEY_SHARE = 51  # the key_share extension


def _key_shares(client_hello: bytes) -> list[int]:
    """The groups a ClientHello record carries key shares for."""
    pos = 5 + 4 + 2 + 32  # record header, handshake header, legacy_version, random
    pos += 1 + client_hello[pos]  # session id
    pos += 2 + int.from_bytes(client_hello[pos : pos + 2])  # cipher suites
    pos += 1 + client_hello[pos]  # compression methods
    end = pos + 2 + int.from_bytes(client_hello[pos : pos + 2])
    pos += 2
    while pos < end:
        kind, size = (int.from_bytes(client_hello[pos + i : pos + i + 2]) for i in (0, 2))
        body = client_hello[pos + 4 : pos + 4 + size]
        pos += 4 + size
        if kind == KEY_SHARE:
            groups, at = [], 2
            while at < len(body):
                groups.append(int.from_bytes(body[at : at + 2]))
                at += 4 + int.from_bytes(body[at + 2 : at + 4])
            return groups
    return []


def _generation(pki: Pki, name: str) -> Generation:
    creds = pki.issue(name)
    bundle = TrustBundle(TD, (pki.root,))
    svid = Svid.check(list(creds.chain), creds.key, bundle, SpiffeId.resolve(name, TD), utcnow())
    return Generation.build(1, svid, lambda *_: True)


def _client(gen: Generation) -> SSL.Connection:
    conn = SSL.Connection(gen.client, None)
    conn.set_connect_state()
    return conn


def _step(conn: SSL.Connection) -> bool:
    try:
        conn.do_handshake()
    except SSL.WantReadError:
        return False
    return True


def _flights(client: SSL.Connection, send: Callable[[bytes], bytes]) -> int:
    """Drive the client against a server (bytes in, bytes out): the server flights it took."""
    flights = 0
    for _ in range(10):
        done = _step(client)
        try:
            out = client.bio_read(1 << 20)
        except SSL.WantReadError:
            out = b""
        reply = send(out) if out else b""
        if done:
            return flights
        if reply:
            flights += 1
            client.bio_write(reply)
    raise AssertionError("handshake did not finish")


def _server(gen: Generation) -> SSL.Connection:
    conn = SSL.Connection(gen.server_context(0.0), None)
    conn.set_accept_state()
    return conn


def _handshake_with(client: SSL.Connection, server: SSL.Connection) -> int:
    """A handshake between two sidecars' contexts; the server flights it took."""

    def send(data: bytes) -> bytes:
        server.bio_write(data)
        _step(server)
        try:
            return server.bio_read(1 << 20)
        except SSL.WantReadError:
            return b""

    return _flights(client, send)


def test_a_sidecar_offers_one_key_share_the_hybrid_one(pki: Pki) -> None:
    client = _client(_generation(pki, "web"))
    assert not _step(client)
    assert _key_shares(client.bio_read(1 << 20)) == [HYBRID_CODE]


def test_two_sidecars_agree_on_the_hybrid_group_in_one_round_trip(pki: Pki) -> None:
    client = _client(_generation(pki, "web"))
    flights = _handshake_with(client, _server(_generation(pki, "api")))
    assert client.get_group_name() == HYBRID
    assert flights == 1  # no HelloRetryRequest: the one key share offered was taken


def test_a_server_without_ml_kem_still_gets_a_connection(pki: Pki, tmp_path: Path) -> None:
    ctx = server_context(tmp_path, pki.issue("api"))
    try:
        ctx.set_ecdh_curve("prime256v1")  # a server that knows only P-256
    except (ValueError, ssl.SSLError):
        pytest.skip("the stdlib's OpenSSL cannot restrict its groups")
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    server = ctx.wrap_bio(incoming, outgoing, server_side=True)

    def send(data: bytes) -> bytes:
        incoming.write(data)
        with contextlib.suppress(ssl.SSLWantReadError):
            server.do_handshake()
        return outgoing.read()

    client = _client(_generation(pki, "web"))
    flights = _flights(client, send)
    assert client.get_group_name() == "secp256r1"
    assert flights == 2  # a HelloRetryRequest, then the server's flight


def test_two_sidecars_agree_on_aes_128_gcm(pki: Pki) -> None:
    client = _client(_generation(pki, "web"))
    _handshake_with(client, _server(_generation(pki, "api")))
    assert client.get_cipher_name() == "TLS_AES_128_GCM_SHA256"


def test_a_server_that_insists_on_aes_256_gets_it(pki: Pki) -> None:
    api = _generation(pki, "api")
    api.server.set_tls13_ciphersuites(b"TLS_AES_256_GCM_SHA384")
    client = _client(_generation(pki, "web"))
    _handshake_with(client, _server(api))
    assert client.get_cipher_name() == "TLS_AES_256_GCM_SHA384"
