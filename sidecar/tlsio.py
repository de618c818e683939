"""The trio shell around pyOpenSSL on non-blocking sockets.

Theory of operation. Each proxied connection is a plain socket and a TLS
connection, both non-blocking. The handshake runs in the connection's task,
driven by `trio.lowlevel.wait_readable` / `wait_writable` on the file
descriptor; OpenSSL may hold bytes epoll cannot see, so every operation is
tried first and waited on only when OpenSSL says it would block. After the
handshake the bytes are moved by `sidecar.pump` and `sidecar.flow`, which use the
non-blocking calls here.

A TCP FIN without close_notify is a truncation, reported as `TruncatedError`.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable

import trio
from OpenSSL import SSL, crypto

from sidecar.sessions import SessionCache

RECORD = 16 * 1024  # one TLS record's worth of plaintext: the most one SSL_read returns

# The copy loop's two calls, SSL_read and SSL_write, made straight through the
# binding pyOpenSSL itself uses. pyOpenSSL's recv_into allocates and copies a
# 16 KiB buffer per call, and both wrappers run checks that only matter in a
# handshake: together about 6 µs a call, measured, which is a tenth of what a
# sidecar spends on a small request. Successes and would-block are handled
# here; every other outcome goes back to pyOpenSSL's own error mapping, from
# the same untouched error state. If the private binding ever moves, the
# public wrappers are used.
try:
    from OpenSSL._util import ffi as _ffi
    from OpenSSL._util import lib as _lib

    _SSL_read = _lib.SSL_read
    _SSL_do_handshake = _lib.SSL_do_handshake
    _SSL_write = _lib.SSL_write
    _SSL_get_error = _lib.SSL_get_error
    _SSL_session_reused = _lib.SSL_session_reused
    _X509_digest = _lib.X509_digest
    _SHA256 = _lib.EVP_get_digestbyname(b"sha256")
    _WANT_READ = _lib.SSL_ERROR_WANT_READ
    _WANT_WRITE = _lib.SSL_ERROR_WANT_WRITE
    _ZERO_RETURN = _lib.SSL_ERROR_ZERO_RETURN
    _from_buffer = _ffi.from_buffer
    # pyOpenSSL's own error mapping, used on the rare failure path: check it is
    # there now, or a renamed method would turn the first TLS error into a crash.
    getattr(SSL.Connection, "_raise_ssl_error")  # noqa: B009 - private, may move
except (ImportError, AttributeError):  # pyOpenSSL reorganised: the wrappers still work
    _SSL_read = None


def cert_digest(cert: crypto.X509) -> bytes:
    """The certificate's SHA-256, raw: a cache key, a quarter of the cost of `X509.digest`.

    pyOpenSSL's digest spends most of its time spelling the hash in colon-separated hex.
    """
    raw = getattr(cert, "_x509", None) if _SSL_read is not None else None
    if raw is None:
        return cert.digest("sha256")
    out = _ffi.new("unsigned char[]", 64)
    size = _ffi.new("unsigned int *")
    if not _X509_digest(raw, _SHA256, out, size):
        return cert.digest("sha256")
    return bytes(_ffi.buffer(out, size[0]))


def _same_session(a: SSL.Session, b: SSL.Session | None) -> bool:
    """Whether two pyOpenSSL sessions wrap the same OpenSSL session (one ticket)."""
    if b is None:
        return False
    return bool(getattr(a, "_session", a) == getattr(b, "_session", b))


class TruncatedError(Exception):
    """The peer closed TCP without close_notify."""


class PeerResetError(Exception):
    """The peer reset the connection or it failed at the socket level."""


class TlsStream:
    __slots__ = (
        "_ssl",
        "clock",
        "conn",
        "fd",
        "offered",
        "sent_close",
        "session_key",
        "sessions",
        "sock",
    )

    def __init__(
        self,
        conn: SSL.Connection,
        sock: socket.socket,
        *,
        sessions: SessionCache[SSL.Session] | None = None,
        session_key: str = "",
        offered: SSL.Session | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.conn = conn
        self.clock = clock
        self.sessions = sessions  # until this connection's session is kept
        self.session_key = session_key
        self.offered = offered
        self.sock = sock
        self.fd = sock.fileno()
        self.sent_close = False
        self._ssl = getattr(conn, "_ssl", None) if _SSL_read is not None else None

    def keep_session(self) -> None:
        """Keep this client connection's new session, once, for one later connection.

        Tried when the first bytes arrive from the upstream (its tickets come
        first, right after the handshake), so that a connection that stays
        open does not hold its upstream's next resumption; and tried again at
        the end. A session is new when the upstream sent a ticket: without
        one it is the session this connection was offered, already used.
        """
        if self.sessions is None:
            return
        with contextlib.suppress(SSL.Error):
            session = self.conn.get_session()
            if session is None or _same_session(session, self.offered):
                return
            self.sessions.put(self.session_key, session, self.clock())
            self.sessions = None

    @property
    def resumed(self) -> bool:
        """Whether the handshake resumed a session (so no certificate was verified in it)."""
        ssl = self._ssl
        if ssl is None:
            return False  # pyOpenSSL names no such call: treated as full (judged either way)
        return bool(_SSL_session_reused(ssl))

    async def handshake(self) -> None:
        """Drive the handshake to its end, waiting on the socket whenever OpenSSL would block.

        Straight through the binding, like the copy loop: pyOpenSSL turns every
        would-block into a raised exception (twice or more per handshake). Success
        and failure still go through pyOpenSSL's own checks, so a problem its
        verify-callback wrapper recorded is raised exactly as it would raise it.
        """
        ssl = self._ssl
        if ssl is None:
            while True:
                try:
                    self.conn.do_handshake()
                    return
                except SSL.WantReadError:
                    await trio.lowlevel.wait_readable(self.fd)
                except SSL.WantWriteError:
                    await trio.lowlevel.wait_writable(self.fd)
        while True:
            result: int = _SSL_do_handshake(ssl)
            if result == 1:
                self.conn._raise_ssl_error(ssl, result)  # raises only what the callback left
                return
            error = _SSL_get_error(ssl, result)
            if error == _WANT_READ:
                await trio.lowlevel.wait_readable(self.fd)
            elif error == _WANT_WRITE:
                await trio.lowlevel.wait_writable(self.fd)
            else:
                self.conn._raise_ssl_error(ssl, result)  # pyOpenSSL names the error
                raise SSL.Error(f"SSL_do_handshake failed ({error})")

    def recv_into_nowait(self, view: memoryview) -> int:
        """Decrypt into `view`. -1 when it would block, 0 at close_notify."""
        ssl = self._ssl
        try:
            if ssl is None:
                got = self.conn.recv_into(view, RECORD)
                if self.sessions is not None:
                    self.keep_session()
                return got
            n: int = _SSL_read(ssl, _from_buffer(view), min(len(view), RECORD))
            if n > 0:
                if self.sessions is not None:
                    self.keep_session()
                return n
            error = _SSL_get_error(ssl, n)
            if error == _WANT_READ:
                return -1
            if error == _ZERO_RETURN:
                return 0
            self.conn._raise_ssl_error(ssl, n)  # pyOpenSSL names the error
            raise SSL.Error(f"SSL_read failed ({error})")
        except SSL.WantReadError:
            return -1
        except SSL.ZeroReturnError:
            return 0
        except SSL.SysCallError as exc:
            if exc.args and exc.args[0] == -1:
                raise TruncatedError("peer closed the connection without close_notify") from None
            raise PeerResetError(str(exc.args[1] if len(exc.args) > 1 else exc)) from None

    def send_nowait(self, data: memoryview) -> int:
        """Encrypt and send some of `data`; raises SSL.WantWriteError / WantReadError to wait."""
        ssl = self._ssl
        if ssl is None:
            return self.conn.send(data)
        n: int = _SSL_write(ssl, _from_buffer(data), len(data))
        if n > 0:
            return n
        error = _SSL_get_error(ssl, n)
        if error == _WANT_WRITE:
            raise SSL.WantWriteError()
        if error == _WANT_READ:
            raise SSL.WantReadError()
        self.conn._raise_ssl_error(ssl, n)  # pyOpenSSL names the error
        raise SSL.Error(f"SSL_write failed ({error})")


def _openssl_reasons(exc: SSL.Error) -> str:
    parts = []
    for item in exc.args[0] if exc.args and isinstance(exc.args[0], list) else []:
        if isinstance(item, tuple) and item:
            parts.append(str(item[-1]))
    return " ".join(parts).lower()


def handshake_failure_reason(exc: SSL.Error) -> str:
    """A stable reason for a handshake that OpenSSL (not our verify callback) failed."""
    if isinstance(exc, SSL.SysCallError):
        return "connection_closed"
    text = _openssl_reasons(exc)
    table = (
        ("http request", "plaintext_http"),
        ("peer did not return a certificate", "no_client_certificate"),
        ("certificate required", "no_client_certificate"),
        ("wrong version number", "not_tls"),
        ("packet length too long", "not_tls"),
        ("unknown protocol", "not_tls"),
        ("record layer failure", "not_tls"),
        ("unexpected message", "not_tls"),
        ("unsupported protocol", "tls_version"),
        ("protocol version", "tls_version"),
        ("no protocols available", "tls_version"),
        ("no shared cipher", "tls_version"),
        ("unknown ca", "rejected_by_peer"),
        ("bad certificate", "rejected_by_peer"),
        ("certificate unknown", "rejected_by_peer"),
        ("access denied", "rejected_by_peer"),
        ("certificate verify failed", "untrusted_certificate"),
        # CertificateVerify does not match the certificate: whoever sent it lacks its key
        ("bad signature", "key_not_proved"),
    )
    for needle, reason in table:
        if needle in text:
            return reason
    return "tls_error"


def stream_failure_reason(exc: SSL.Error) -> str:
    """A stable reason for a TLS error after the handshake (alerts from the peer included)."""
    reason = handshake_failure_reason(exc)
    return "peer_reset" if reason in ("connection_closed", "tls_error", "not_tls") else reason
