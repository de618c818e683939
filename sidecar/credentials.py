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

Resumption. Inbound, OpenSSL issues TLS 1.3 session tickets sealed with
keys it draws at random when the server context is built; they live in
memory only, never on disk. Whoever held those keys could mint a session
for any certificate, so they are rotated: pyOpenSSL offers no call to set
or roll them, so the generation's server context (and only it: the
credentials stay as they are) is rebuilt from the same credentials every
TICKET_KEY_LIFETIME; a ticket sealed under the old keys then fails to open
and that client does one full handshake. Every new generation has new keys
of its own. Outbound, sessions are kept per upstream in the
generation's `SessionCache` (sidecar/sessions.py). Either way a session
resumes only within the generation that judged its full handshake, so its
chain was judged under the trust bundles still in force; the gate judges
its leaf again on every connection (sidecar/gate.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from cryptography import x509
from OpenSSL import SSL, crypto
from OpenSSL._util import lib as _lib

from meshid.bundle import TrustBundle
from meshid.errors import InvalidSvid
from meshid.federation import Bundles
from meshid.spiffeid import SpiffeId
from meshid.svid import PrivateKey, public_key_matches, verify_svid
from sidecar.sessions import SessionCache

# Modes pyOpenSSL does not name: write records as soon as one is ready (so
# `send` reports progress record by record), and let a retried write come
# from a different buffer object holding the same bytes.
_MODE_ENABLE_PARTIAL_WRITE = 0x1
_MODE_ACCEPT_MOVING_WRITE_BUFFER = 0x2
SESSION_ID_CONTEXT = b"meshid"
SESSION_TIMEOUT = 300  # seconds a session may be resumed (the ticket's lifetime)
# Seconds the inbound ticket keys seal tickets before the server context is
# rebuilt. A key read out of memory is useful for this long at most (plus a
# ticket's lifetime); each rotation costs a client one full handshake per
# ticket it holds, so every 15 minutes is cheap.
TICKET_KEY_LIFETIME = 900.0
# The key exchange groups a client offers, in order. The hybrid post-quantum
# group first, and it alone gets a key share: OpenSSL's default also sends an
# X25519 share, for servers without ML-KEM, which our peers (sidecars on the
# same library) never need; it cost a tenth of a resumed handshake. A server
# without ML-KEM asks for one of the others (one more round trip). Servers
# keep OpenSSL's defaults, so no client's choice is refused.
CLIENT_GROUPS = (
    b"X25519MLKEM768:X25519:secp256r1:X448:secp384r1:secp521r1:"
    b"ffdhe2048:ffdhe3072:ffdhe4096:ffdhe6144:ffdhe8192"
)
# The TLS 1.3 cipher suites a client offers, in order. AES-128-GCM first, as
# Go, BoringSSL (Envoy) and browsers order them (OpenSSL puts AES-256 first):
# its SHA-256 key schedule runs on the CPU's SHA instructions where SHA-384's
# does not, which was about a tenth of a resumed handshake, and AES-128 is a
# 128-bit security level that post-quantum analysis leaves standing. A server
# that prefers another suite still gets it: every suite stays on offer.
CLIENT_CIPHERS = b"TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"
# OpenSSL's X509_V_FLAG_NO_CHECK_TIME (pyOpenSSL does not name it): the verify
# callback judges every certificate's times on the process's one clock
# instead, so an injected clock governs expiry on the mTLS ports too.
X509_V_FLAG_NO_CHECK_TIME = 0x200000

VerifyCallback = Callable[[SSL.Connection, crypto.X509, int, int, int], bool]


@dataclass(frozen=True, slots=True)
class Svid:
    """A checked SVID with its key: the leaf is `spiffe_id`, valid now, chains to `bundle`."""

    spiffe_id: SpiffeId
    chain: tuple[x509.Certificate, ...]
    key: PrivateKey
    bundle: TrustBundle
    # Bundles of federated trust domains: their roots join the OpenSSL store so a
    # foreign chain can be built, but each peer is then judged against its own
    # domain's bundle alone (Gate.verify, meshid.federation).
    federated: tuple[TrustBundle, ...] = ()

    @property
    def bundles(self) -> Bundles:
        return Bundles(self.bundle, self.federated)

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
        federated: tuple[TrustBundle, ...] = (),
    ) -> Svid:
        Bundles(bundle, federated)  # one bundle per trust domain, or InvalidSvid
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
        return cls(identity, tuple(chain), key, bundle, federated)


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
    for trusted in (svid.bundle, *svid.federated):
        for root in trusted.roots:
            store.add_cert(crypto.X509.from_cryptography(root))
    store.set_flags(X509_V_FLAG_NO_CHECK_TIME)
    _set_verify(ctx, SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, verify)
    ctx.set_verify_depth(4)
    return ctx


def _set_client_groups(ctx: SSL.Context) -> None:
    """CLIENT_GROUPS, when this OpenSSL knows them all (else its defaults, which work too)."""
    raw: Any = getattr(ctx, "_context", None)
    setter = getattr(_lib, "SSL_CTX_set1_curves_list", None)
    if raw is not None and setter is not None and setter(raw, CLIENT_GROUPS) != 1:
        _lib.ERR_clear_error()


def _server_context(svid: Svid, verify: VerifyCallback) -> SSL.Context:
    server = _base_context(SSL.TLS_SERVER_METHOD, svid, verify)
    server.set_session_id(SESSION_ID_CONTEXT)
    server.set_timeout(SESSION_TIMEOUT)
    return server


def _set_verify(ctx: SSL.Context, mode: int, verify: VerifyCallback) -> None:
    """set_verify, but a refusal by our callback reaches the peer as `bad_certificate`.

    pyOpenSSL leaves the verification error at X509_V_OK when a callback says
    no, and OpenSSL then sends the peer an `internal_error` alert: the refused
    side would read it as our fault, not as a refusal. Wrapping pyOpenSSL's
    callback to set X509_V_ERR_CERT_REJECTED makes the alert `bad_certificate`.
    This reaches into pyOpenSSL's private binding; if that ever moves, the
    plain set_verify (and the vaguer alert) is kept.
    """
    ctx.set_verify(mode, verify)
    try:
        from OpenSSL._util import ffi, lib

        inner: Any = getattr(ctx, "_verify_callback")  # noqa: B009 - private, may move
        raw_ctx: Any = getattr(ctx, "_context")  # noqa: B009

        def refuse_as_bad_certificate(ok: int, store_ctx: Any) -> int:
            result = int(inner(ok, store_ctx))
            if not result and lib.X509_STORE_CTX_get_error(store_ctx) == lib.X509_V_OK:
                lib.X509_STORE_CTX_set_error(store_ctx, lib.X509_V_ERR_CERT_REJECTED)
            return result

        wrapped: Any = ffi.callback("int (*)(int, X509_STORE_CTX *)", refuse_as_bad_certificate)
        lib.SSL_CTX_set_verify(raw_ctx, mode, wrapped)
        setattr(ctx, "_meshid_verify", wrapped)  # noqa: B010 - keeps the C callback alive
    except (ImportError, AttributeError):
        return


@dataclass(eq=False, slots=True)
class Generation:
    """One set of credentials and the TLS contexts built from it."""

    number: int
    svid: Svid
    server: SSL.Context  # the current one: see server_context
    client: SSL.Context
    verify: VerifyCallback
    tickets_since: float  # monotonic time the server context (its ticket keys) was built
    bundles: Bundles  # svid.bundles, built once: every connection's judgement reads them
    # Client sessions for resumption, by upstream; bound to this generation's context.
    sessions: SessionCache[SSL.Session] = field(
        default_factory=lambda: SessionCache(max_age=SESSION_TIMEOUT)
    )

    @classmethod
    def build(cls, number: int, svid: Svid, verify: VerifyCallback, now: float = 0.0) -> Generation:
        """Both TLS contexts, or InvalidSvid if OpenSSL refuses what our checks let through.

        A certificate can chain, match its key and name the right identity and
        still be refused by OpenSSL's security level (a 1024-bit RSA key): that
        is a bad credential like any other, which a reload reports and survives.
        """
        try:
            server = _server_context(svid, verify)
            client = _base_context(SSL.TLS_CLIENT_METHOD, svid, verify)
            _set_client_groups(client)
            client.set_tls13_ciphersuites(CLIENT_CIPHERS)
            client.set_timeout(SESSION_TIMEOUT)
        except (SSL.Error, crypto.Error) as exc:
            # OpenSSL's error queue names routines and reasons, never key material.
            raise InvalidSvid(
                f"OpenSSL refuses these credentials: {_openssl_reason(exc)}",
                reason="unusable_credentials",
            ) from None
        return cls(number, svid, server, client, verify, now, svid.bundles)

    def server_context(self, now: float) -> SSL.Context:
        """The server context for a new connection, with ticket keys younger than their lifetime.

        Rebuilt from the same, already checked credentials: should OpenSSL
        refuse them now, the old context is kept (a rotation is not worth a
        refused connection) and tried again after another lifetime.
        """
        if now - self.tickets_since >= TICKET_KEY_LIFETIME:
            self.tickets_since = now
            with contextlib.suppress(SSL.Error, crypto.Error):
                self.server = _server_context(self.svid, self.verify)
        return self.server


def _openssl_reason(exc: Exception) -> str:
    """The last reason in OpenSSL's error list ('ee key too small'), or the error's text."""
    errors = exc.args[0] if exc.args and isinstance(exc.args[0], list) else []
    reasons = [str(e[2]) for e in errors if isinstance(e, tuple) and len(e) == 3 and e[2]]
    return reasons[-1] if reasons else str(exc)[:200]
