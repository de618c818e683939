"""The sidecar's client for the control plane (`meshid ca serve`): enroll, renew, watch.

HTTPS with h11 over trio's SSLStream (stdlib ssl), on connections kept
alive between requests; what an answer means (a document, a refusal, a
stream of documents) is `sidecar.answer`'s. Theory of operation: every long poll (re-parked
every ~25 s), report and renewal used to cost a TCP connection and a full
TLS 1.3 handshake with a client certificate, and across a fleet those
handshakes were most of the authority's work. So each `ControlClient` (one
per authority server) keeps the connections it finished with, at most
`POOL_SIZE` of them, each for at most `POOL_IDLE` seconds (well under the
authority's 60 s, so that it is not the authority that closes them under
a request). A request takes the newest idle connection made with the same
client credentials and trust bundle, or opens one; requests in flight at
once (a parked watch and a report) each hold their own, so a sidecar keeps
about two. The server's identity was checked at the handshake; the
authority judges the client certificate (expiry, revocation) on every
request, not only at the handshake. After a renewal the credentials differ:
new requests open a connection with the new SVID, and the connections of
the old one are closed as soon as they are idle.

A kept connection may have been closed by the authority meanwhile (its
idle timeout, a restart). One the peer already closed is seen before it is
used (it is readable while no request is outstanding) and dropped, and the
request goes out on a fresh connection instead; so is one that breaks
before any of the request could be sent. A request that went out and then
lost its connection before a word of the answer is not sent again here,
not even a GET: with our idle limit half the authority's, that is the
authority going away under it (a restart ends every parked watch of the
fleet at once), and an immediate retry from every sidecar would be the very
herd the feed's fully jittered retry spreads out. A POST (renewal,
enrollment, report) is never repeated here either: a repeated renewal
issues a second SVID. The duties retry as they always did.
`drop` closes every idle connection at once (failover moves away from
this server).

The control plane is authenticated by its SPIFFE ID,
``spiffe://TD/meshid/authority``, against the current trust bundle, not by
host name: the sidecar may reach it through any address. Certificate times
are checked by us with the configured clock-skew allowance rather than by
OpenSSL, so a sidecar whose clock is a minute off still talks to it.

The client certificate is the SVID in memory (`HeldIdentity`), not the copy in
the state directory: that copy may lag behind (a full disk) or be unreadable,
and the control plane must still hear from a sidecar that serves fine. The
stdlib loads a certificate only from a path, so the PEM goes into an
anonymous in-memory file (memfd) that is closed as soon as it is loaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import ssl
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import h11
import trio
from cryptography import x509

from meshid.errors import MeshIdError
from meshid.spiffeid import SpiffeId, TrustDomain
from meshid.svid import leaf_spiffe_id
from meshid.wire import AUTHORITY_PATH
from sidecar import failures
from sidecar.answer import ControlPlaneError as ControlPlaneError  # what callers catch
from sidecar.answer import Each, Lines, judge, retry_after_header
from sidecar.config import Address
from sidecar.controlpool import POOL_IDLE, POOL_SIZE, Kept, KeptPool
from sidecar.failures import Failure
from sidecar.sockets import connect

MAX_RESPONSE = 1024 * 1024
CONNECT_TIMEOUT = 3.0  # seconds to connect and finish TLS: a healthy authority takes far less
_X509_V_FLAG_NO_CHECK_TIME = 0x200000  # times are checked below, with skew allowance

UNREACHABLE = "authority_unreachable"


class _FirstBytes(trio.abc.Stream):
    """A stream that remembers the first bytes the server sent (plain HTTP says "HTTP/")."""

    def __init__(self, inner: trio.SocketStream) -> None:
        self.inner = inner
        self.first = b""

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self.inner.receive_some(max_bytes)
        if len(self.first) < 8:
            self.first += bytes(data[: 8 - len(self.first)])
        return data

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()


@dataclass(frozen=True, slots=True)
class ClientIdentity:
    """A client certificate and key in files."""

    cert: Path
    key: Path


@dataclass(frozen=True, slots=True)
class HeldIdentity:
    """A client certificate held in memory: one PEM with the key and its chain."""

    pem: bytes = field(repr=False)


def _load_held(ctx: ssl.SSLContext, pem: bytes) -> None:
    fd = os.memfd_create("meshid-client-identity", os.MFD_CLOEXEC)
    try:
        view = memoryview(pem)
        while view:
            view = view[os.write(fd, view) :]
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def _connect_errno(exc: OSError) -> tuple[int | None, str]:
    """The errno behind a failed connect: trio reports "all attempts … failed" and keeps
    each address's own error as the cause, in a group when there were several."""
    cause: BaseException | None = exc
    while cause is not None and getattr(cause, "errno", None) is None:
        cause = cause.exceptions[0] if isinstance(cause, BaseExceptionGroup) else cause.__cause__
    if isinstance(cause, OSError):
        return cause.errno, str(cause.strerror or cause)
    return None, str(exc.strerror or exc)


class ControlClient:
    def __init__(
        self,
        host: str,
        port: int,
        trust_domain: TrustDomain,
        *,
        timeout: float = 15.0,
        skew: timedelta = timedelta(seconds=60),
        mark: int | None = None,
        connect_timeout: float = CONNECT_TIMEOUT,
        pool_size: int = 0,
        pool_idle: float = POOL_IDLE,
    ) -> None:
        self.host = host
        self.port = port
        self.mark = mark  # SO_MARK under [transparent], so that the capture rules skip us
        self.expected = SpiffeId(trust_domain, AUTHORITY_PATH)
        self.timeout = timeout
        # A host that is gone answers nothing, not even a reset: without a bound of its
        # own, reaching it would cost the whole request's time before the next server.
        self.connect_timeout = connect_timeout
        self.skew = skew
        # Idle connections kept: 0 for a one-shot caller (doctor, a CLI command), which
        # has no later request to spare a handshake for; the sidecar keeps POOL_SIZE.
        self.pool_size = min(max(pool_size, 0), POOL_SIZE)
        self.pool_idle = pool_idle
        self._pool = KeptPool()

    async def _open_tcp(self) -> trio.SocketStream:
        if self.mark is None:
            return await trio.open_tcp_stream(self.host, self.port)
        sock = await connect(Address(self.host, self.port), self.connect_timeout, self.mark)
        return trio.SocketStream(trio.socket.from_stdlib_socket(sock))

    def _context(
        self, bundle_pem: bytes, identity: ClientIdentity | HeldIdentity | None
    ) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.check_hostname = False  # the SPIFFE ID is checked instead
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.verify_flags |= _X509_V_FLAG_NO_CHECK_TIME
        try:
            ctx.load_verify_locations(cadata=bundle_pem.decode("ascii"))
            if isinstance(identity, HeldIdentity):
                _load_held(ctx, identity.pem)
            elif identity is not None:
                ctx.load_cert_chain(identity.cert, identity.key)
        except (ssl.SSLError, OSError, UnicodeDecodeError, ValueError) as exc:
            # str(exc) of these names a file or an OpenSSL error, never key material
            raise ControlPlaneError.judged(
                Failure(failures.LOCAL, self._where, detail=str(exc))
            ) from None
        return ctx

    @property
    def _where(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def _check_server(self, der: bytes | None, now: datetime) -> datetime:
        """Check the server is the authority, valid now; its certificate's end."""
        if not der:
            raise ControlPlaneError("control plane sent no certificate", reason="authority_tls")
        cert = x509.load_der_x509_certificate(der)
        try:
            sid = leaf_spiffe_id(cert)
        except MeshIdError as exc:
            raise ControlPlaneError.judged(
                Failure(failures.IDENTITY, self._where, detail=exc.message)
            ) from None
        if sid != self.expected:
            raise ControlPlaneError.judged(
                Failure(
                    failures.IDENTITY,
                    self._where,
                    presented=str(sid),
                    presented_trust_domain=sid.trust_domain.name,
                    expected=str(self.expected),
                )
            )
        if not (
            cert.not_valid_before_utc - self.skew <= now <= cert.not_valid_after_utc + self.skew
        ):
            raise ControlPlaneError(
                f"control plane certificate is not valid now (valid "
                f"{cert.not_valid_before_utc:%H:%M:%S} to {cert.not_valid_after_utc:%H:%M:%S}Z): "
                "is this host's clock right?",
                reason="authority_tls",
                brief="authority certificate not valid now (clock?)",
            )
        return cert.not_valid_after_utc

    async def request(
        self,
        method: str,
        target: str,
        body: dict[str, Any] | None,
        *,
        bundle_pem: bytes,
        now: datetime,
        identity: ClientIdentity | HeldIdentity | None = None,
        wait: float | None = None,
        trust: str = "authority.bundle",
        each: Each | None = None,
    ) -> dict[str, Any]:
        """One request; `wait` overrides the deadline (a long poll needs more).

        Every failure is a `ControlPlaneError` judged by `sidecar.failures`;
        `trust` names what the server's certificate is checked against, for
        the message when it does not chain.

        `each`: the answer is a stream of JSON documents, one a line (a watch
        with stream=1): each is handed to `each` as it arrives, and the last
        one is returned ({} if none came). A refusal is judged whole as ever.
        """
        # Anonymous connections (enrollment) are rare and the authority keeps them
        # only briefly: they are not kept.
        key = None if identity is None else _credentials_key(bundle_pem, identity)
        self._pool.tidy(key, now, idle_limit=self.pool_idle, skew=self.skew)
        with trio.move_on_after(wait if wait is not None else self.timeout) as scope:
            kept = self._pool.take(key)
            if kept is not None:
                try:
                    return await self._on(kept, method, target, body, each)
                except _Unsent:
                    pass  # the authority closed it meanwhile: on a fresh one instead
            kept = await self._connect(bundle_pem, identity, key, now, trust)
            try:
                return await self._on(kept, method, target, body, each)
            except _Unsent as unsent:
                raise unsent.error from None
        assert scope.cancelled_caught
        raise ControlPlaneError.judged(Failure(failures.TIMEOUT, self._where))

    def drop(self) -> None:
        """Close every idle connection now (failover moved away from this server)."""
        self._pool.drop()

    def idle(self) -> int:
        """How many connections are kept idle now."""
        return len(self._pool)

    async def _on(
        self,
        kept: Kept,
        method: str,
        target: str,
        body: dict[str, Any] | None,
        each: Each | None = None,
    ) -> dict[str, Any]:
        """The request on `kept`, which goes back to the pool if it may serve another."""
        try:
            return await self._exchange(kept, method, target, body, each)
        finally:
            if not self._pool.put_back(kept, self.pool_size):
                await trio.aclose_forcefully(kept.stream)

    async def _connect(
        self,
        bundle_pem: bytes,
        identity: ClientIdentity | HeldIdentity | None,
        key: bytes | None,
        now: datetime,
        trust: str,
    ) -> Kept:
        """A new connection, the TLS handshake done and the server's identity checked."""
        ctx = self._context(bundle_pem, identity)
        where = self._where
        # Connecting and the TLS handshake have a shorter deadline than the request
        # (a long poll's wait is the server's to spend, not the handshake's).
        connected_by = trio.current_time() + self.connect_timeout
        with trio.move_on_at(connected_by) as connecting:
            try:
                tcp = await self._open_tcp()
            except OSError as exc:
                code, detail = _connect_errno(exc)
                raise ControlPlaneError.judged(
                    Failure(failures.CONNECT, where, errno=code, detail=detail)
                ) from None
        if connecting.cancelled_caught:
            raise self._not_connected()
        raw = _FirstBytes(tcp)
        stream = trio.SSLStream(raw, ctx, server_hostname=None)
        done = False
        try:
            with trio.move_on_at(connected_by) as connecting:
                await self._handshake(stream, raw, trust)
            if connecting.cancelled_caught:
                raise self._not_connected()
            der = stream.getpeercert(binary_form=True)
            server_not_after = self._check_server(der, now)
            done = True
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise self._closed(exc) from None
        finally:
            if not done:
                await trio.aclose_forcefully(stream)
        opened = trio.current_time()
        return Kept(stream, tcp, h11.Connection(h11.CLIENT), key, server_not_after, opened)

    def _closed(self, exc: BaseException) -> ControlPlaneError:
        cause = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) else exc
        return ControlPlaneError.judged(
            Failure(
                failures.CLOSED,
                self._where,
                errno=getattr(cause, "errno", None),
                detail=str(cause or exc) or "connection closed",
            )
        )

    def _not_connected(self) -> ControlPlaneError:
        return ControlPlaneError.judged(
            Failure(
                failures.TIMEOUT,
                self._where,
                detail=f"no TLS connection within {self.connect_timeout:g}s",
            )
        )

    async def _handshake(self, stream: trio.SSLStream[Any], raw: _FirstBytes, trust: str) -> None:
        """The TLS handshake; its failures judged by what broke it."""
        where = self._where
        try:
            await stream.do_handshake()
        except (trio.BrokenResourceError, ssl.SSLError) as exc:
            cause = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) else exc
            if isinstance(cause, OSError) and not isinstance(cause, ssl.SSLError):
                raise ControlPlaneError.judged(
                    Failure(
                        failures.CLOSED,
                        where,
                        errno=cause.errno,
                        detail=str(cause.strerror or cause),
                    )
                ) from None
            tls_reason = getattr(cause, "reason", None)
            if isinstance(cause, ssl.SSLEOFError) or (
                cause is None and not raw.first
            ):  # closed during the handshake: restarting, overloaded
                raise ControlPlaneError.judged(
                    Failure(failures.CLOSED, where, detail="closed during the TLS handshake")
                ) from None
            raise ControlPlaneError.judged(
                Failure(
                    failures.TLS,
                    where,
                    tls_reason=tls_reason if isinstance(tls_reason, str) else None,
                    detail=str(
                        getattr(cause, "verify_message", None) or tls_reason or cause or exc
                    ),
                    first_bytes=raw.first,
                    trust=trust,
                )
            ) from None

    async def _exchange(
        self,
        kept: Kept,
        method: str,
        target: str,
        body: dict[str, Any] | None,
        each: Each | None = None,
    ) -> dict[str, Any]:
        conn = kept.http
        payload = json.dumps(body).encode() if body is not None else b""
        headers = [("host", self.host), ("accept", "application/json")]
        if body is not None:
            headers += [("content-type", "application/json"), ("content-length", str(len(payload)))]
        data = conn.send(h11.Request(method=method, target=target, headers=headers)) or b""
        if payload:
            data += conn.send(h11.Data(data=payload)) or b""
        data += conn.send(h11.EndOfMessage()) or b""
        try:
            await kept.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise _Unsent(self._closed(exc)) from None
        heard = False  # a byte of the answer arrived
        status = 0
        retry_after: float | None = None
        received = bytearray()
        lines = Lines(each, self._where) if each is not None else None
        try:
            while True:
                try:
                    event = conn.next_event()
                except h11.RemoteProtocolError as exc:
                    if not heard:  # closed before a word of the answer
                        raise self._closed(exc) from None
                    raise ControlPlaneError.judged(
                        Failure(failures.PROTOCOL, self._where, detail=str(exc))
                    ) from None
                if event is h11.NEED_DATA:
                    chunk = await kept.stream.receive_some(65536)
                    heard = heard or bool(chunk)
                    conn.receive_data(bytes(chunk))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                    retry_after = retry_after_header(event.headers)
                elif isinstance(event, h11.Data):
                    received += event.data
                    if lines is not None and status == 200:
                        await lines.take(received)  # what is left: a line still arriving
                    if len(received) > MAX_RESPONSE:
                        raise ControlPlaneError(
                            "control plane response too large", reason="authority_protocol"
                        )
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    break
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise self._closed(exc) from None
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
            kept.reusable = True
        if lines is not None and status == 200:
            if received.strip():  # a body without its last newline: the answer's last document
                received += b"\n"
                await lines.take(received)
            return lines.last
        return judge(self._where, status, received, retry_after)


def _credentials_key(bundle_pem: bytes, identity: ClientIdentity | HeldIdentity) -> bytes:
    """What a kept connection was made with: reused only for a request presenting the same
    (a digest, so that no key material is kept beyond what the TLS context holds)."""
    digest = hashlib.sha256(bundle_pem)
    if isinstance(identity, HeldIdentity):
        digest.update(b"\0held\0" + identity.pem)
    else:
        digest.update(b"\0files\0")
        for path in (identity.cert, identity.key):
            digest.update(os.fsencode(path) + b"\0")
            with contextlib.suppress(OSError):  # unreadable: the handshake will say so
                digest.update(str(path.stat().st_mtime_ns).encode())
    return digest.digest()


class _Unsent(Exception):
    """A connection broke before the request could be sent: safe to send on another."""

    def __init__(self, error: ControlPlaneError) -> None:
        super().__init__(error.message)
        self.error = error
