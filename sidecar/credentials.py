"""Credentials: one immutable generation of (SVID chain, key, bundle) and its TLS contexts.

Theory of operation. Every rotation, reload or renewal builds a new
`Generation`, with its own server and client `SSL.Context`; the sidecar swaps
one reference. A connection takes the generation current when it starts and
keeps it until it ends, so rotation never disturbs a live connection. A
candidate generation is fully checked (key matches the leaf, the leaf is the
configured identity, valid now and chains to the bundle) before it can
replace the current one; a failed check keeps the old generation.

TLS is pyOpenSSL rather than the stdlib `ssl` module for two things the
stdlib cannot do: a verify callback that rejects a peer inside the handshake
(so a refused client gets an alert, not a silent close), and a single
`SSL_shutdown` that sends close_notify without reading, for a correct
half-close with data still in flight.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from cryptography import x509
from OpenSSL import SSL, crypto

from meshid.bundle import TrustBundle
from meshid.errors import InvalidSvid
from meshid.spiffeid import SpiffeId
from meshid.svid import PrivateKey, public_key_matches, verify_svid

# Modes pyOpenSSL does not name: write records as soon as one is ready (so
# `send` reports progress record by record), and let a retried write come
# from a different buffer object holding the same bytes.
_MODE_ENABLE_PARTIAL_WRITE = 0x1
_MODE_ACCEPT_MOVING_WRITE_BUFFER = 0x2
SESSION_ID_CONTEXT = b"meshid"
SESSION_TIMEOUT = 300

VerifyCallback = Callable[[SSL.Connection, crypto.X509, int, int, int], bool]


@dataclass(frozen=True, slots=True)
class Svid:
    """A checked SVID with its key: the leaf is `spiffe_id`, valid now, chains to `bundle`."""

    spiffe_id: SpiffeId
    chain: tuple[x509.Certificate, ...]
    key: PrivateKey
    bundle: TrustBundle

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def not_after(self) -> datetime:
        return self.leaf.not_valid_after_utc

    @property
    def serial(self) -> int:
        return self.leaf.serial_number

    @classmethod
    def check(
        cls,
        chain: list[x509.Certificate],
        key: PrivateKey,
        bundle: TrustBundle,
        identity: SpiffeId,
        now: datetime,
        skew: timedelta = timedelta(0),
    ) -> Svid:
        if not chain:
            raise InvalidSvid("certificate file holds no certificate", reason="no_certificate")
        if not public_key_matches(key, chain[0]):
            raise InvalidSvid("private key does not match the certificate", reason="key_mismatch")
        leaf = chain[0]
        at = now
        if now < leaf.not_valid_before_utc <= now + skew:
            at = leaf.not_valid_before_utc  # our clock may run behind the authority's
        verified = verify_svid(chain, bundle.roots, at)
        if verified.spiffe_id != identity:
            raise InvalidSvid(
                f"certificate is for {verified.spiffe_id}, but this sidecar is {identity}",
                reason="wrong_identity",
            )
        return cls(identity, tuple(chain), key, bundle)


def _base_context(method: int, svid: Svid, verify: VerifyCallback) -> SSL.Context:
    ctx = SSL.Context(method)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.set_max_proto_version(SSL.TLS1_3_VERSION)
    ctx.set_mode(
        SSL.MODE_RELEASE_BUFFERS | _MODE_ENABLE_PARTIAL_WRITE | _MODE_ACCEPT_MOVING_WRITE_BUFFER
    )
    ctx.use_certificate(svid.leaf)
    for extra in svid.chain[1:]:
        ctx.add_extra_chain_cert(crypto.X509.from_cryptography(extra))
    ctx.use_privatekey(svid.key)
    ctx.check_privatekey()
    store = ctx.get_cert_store()
    assert store is not None
    for root in svid.bundle.roots:
        store.add_cert(crypto.X509.from_cryptography(root))
    ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, verify)
    ctx.set_verify_depth(4)
    return ctx


@dataclass(eq=False, slots=True)
class Generation:
    """One set of credentials and the TLS contexts built from it."""

    number: int
    svid: Svid
    server: SSL.Context
    client: SSL.Context
    # Client sessions for resumption, by upstream; bound to this generation's context.
    sessions: dict[str, SSL.Session] = field(default_factory=dict)

    @classmethod
    def build(cls, number: int, svid: Svid, verify: VerifyCallback) -> Generation:
        server = _base_context(SSL.TLS_SERVER_METHOD, svid, verify)
        server.set_session_id(SESSION_ID_CONTEXT)
        server.set_timeout(SESSION_TIMEOUT)
        client = _base_context(SSL.TLS_CLIENT_METHOD, svid, verify)
        client.set_timeout(SESSION_TIMEOUT)
        return cls(number, svid, server, client)
