"""The trio shell around pyOpenSSL on non-blocking sockets.

Theory of operation. Each proxied connection is a plain socket and a TLS
connection, both non-blocking, driven by `trio.lowlevel.wait_readable` /
`wait_writable` on the file descriptors. Two tasks pump the two directions.
OpenSSL keeps decrypted bytes that epoll cannot see, so every TLS operation
is tried first and waited on only when OpenSSL says it would block.

Both tasks share one TLS object. A read may need to write (and, rarely, a
write may need to read); trio allows only one waiter per fd and direction,
so every wait on the TLS socket goes through a per-direction lock.

Half-close: `shutdown_write` sends close_notify once (one SSL_shutdown, no
read) and then a TCP FIN; reading goes on until the peer's close_notify.
A TCP FIN without close_notify is a truncation, reported as `TruncatedError`.
"""

from __future__ import annotations

import contextlib
import socket

import trio
from OpenSSL import SSL

RECORD = 16 * 1024  # one TLS record's worth of plaintext: the most one SSL_read returns


class TruncatedError(Exception):
    """The peer closed TCP without close_notify."""


class PeerResetError(Exception):
    """The peer reset the connection or it failed at the socket level."""


class TlsStream:
    __slots__ = ("_rlock", "_wlock", "conn", "fd", "sent_close", "session_key", "sessions", "sock")

    def __init__(
        self,
        conn: SSL.Connection,
        sock: socket.socket,
        *,
        sessions: dict[str, SSL.Session] | None = None,
        session_key: str = "",
    ) -> None:
        self.conn = conn
        self.sessions = sessions
        self.session_key = session_key
        self.sock = sock
        self.fd = sock.fileno()
        self._rlock: trio.Lock | None = None
        self._wlock: trio.Lock | None = None
        self.sent_close = False

    async def wait_readable(self) -> None:
        if self._rlock is None:
            self._rlock = trio.Lock()
        async with self._rlock:
            await trio.lowlevel.wait_readable(self.fd)

    async def wait_writable(self) -> None:
        if self._wlock is None:
            self._wlock = trio.Lock()
        async with self._wlock:
            await trio.lowlevel.wait_writable(self.fd)

    def keep_session(self) -> None:
        """Remember a client session for resumption by the next connection to the same upstream."""
        if self.sessions is None:
            return
        with contextlib.suppress(SSL.Error):
            session = self.conn.get_session()
            if session is not None:
                self.sessions[self.session_key] = session

    async def handshake(self) -> None:
        while True:
            try:
                self.conn.do_handshake()
                return
            except SSL.WantReadError:
                await self.wait_readable()
            except SSL.WantWriteError:
                await self.wait_writable()

    def recv_into_nowait(self, view: memoryview) -> int:
        """Decrypt into `view`. -1 when it would block, 0 at close_notify."""
        try:
            return self.conn.recv_into(view, RECORD)
        except SSL.WantReadError:
            return -1
        except SSL.ZeroReturnError:
            return 0
        except SSL.SysCallError as exc:
            if exc.args and exc.args[0] == -1:
                raise TruncatedError("peer closed the connection without close_notify") from None
            raise PeerResetError(str(exc.args[1] if len(exc.args) > 1 else exc)) from None

    async def recv_into(self, view: memoryview) -> int:
        while True:
            try:
                n = self.recv_into_nowait(view)
            except SSL.WantWriteError:
                await self.wait_writable()
                continue
            if n >= 0:
                return n
            await self.wait_readable()

    async def send_all(self, data: memoryview) -> None:
        while data:
            try:
                sent = self.conn.send(data)
            except SSL.WantWriteError:
                await self.wait_writable()
                continue
            except SSL.WantReadError:
                await self.wait_readable()
                continue
            except SSL.SysCallError as exc:
                raise PeerResetError(str(exc)) from None
            data = data[sent:]

    async def shutdown_write(self) -> None:
        """Send close_notify (once) and a TCP FIN; the read side stays open."""
        if self.sent_close:
            return
        while True:
            try:
                self.conn.shutdown()
                break
            except SSL.WantWriteError:
                await self.wait_writable()
            except SSL.WantReadError:
                break  # close_notify is out; the read half is not ours to wait on here
            except (SSL.SysCallError, SSL.Error):
                break
        self.sent_close = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)


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
    )
    for needle, reason in table:
        if needle in text:
            return reason
    return "tls_error"


def stream_failure_reason(exc: SSL.Error) -> str:
    """A stable reason for a TLS error after the handshake (alerts from the peer included)."""
    reason = handshake_failure_reason(exc)
    return "peer_reset" if reason in ("connection_closed", "tls_error", "not_tls") else reason
