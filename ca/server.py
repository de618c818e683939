"""`meshid ca serve`: the control plane's trio shell around `ca.api`.

Theory of operation:

- TLS 1.3 with the stdlib `ssl` module. The server's certificate is an SVID
  for ``spiffe://TD/meshid/authority`` (plus the operator's DNS names and
  IPs), signed by the active root and re-issued at half its lifetime, when
  the active root changes, and when the bundle changes (the client-CA list
  is the bundle). Each issue builds a new context; live connections keep
  theirs. Client certificates are optional at the TLS layer (enrollment
  has none) and required by the endpoints that need them.
- HTTP/1.1 with h11, keep-alive, one request at a time per connection. A
  request must arrive whole within `request_timeout` (a slow client gets
  408) and its body may not exceed 64 KiB (413); a reply must be taken
  within `request_timeout` too. Every method is answered: HEAD as GET
  without the body, a method the path does not take 405 with ``Allow``, a
  method this server does not know 501.
- Failure boundaries: each connection is one unit of work. Whatever its
  peer sends, and whatever the authority raises while answering it (a full
  disk, a bug), ends that request or that connection only: the request gets
  503 with ``Retry-After`` when the authority failed, the connection is
  closed and ``internal_error`` logged with the exception's type for
  anything else. The poller and the batcher log and carry on likewise.
- Admission: a connection that has not shown a client certificate is
  *anonymous*. Anonymous connections are capped per source address
  (`max_per_source`: more are closed at once) and in all (`max_connections`:
  the oldest makes room for the newest), and may idle only
  `anonymous_idle_timeout`. A connection whose handshake carried a
  certificate of this trust domain moves to a separate pool
  (`max_authenticated`), and long-poll watches have a budget of their own
  (`max_watches_per_identity`, `max_watches`; past it a watch is answered
  429 with ``Retry-After``): a flood of anonymous connections cannot take the
  places sidecars need.
- The authority is synchronous (SQLite). Calls go to one worker thread at a
  time, so a CLI command holding the database lock stalls requests, not the
  event loop.
- One poller reads the database's version counters a few times a second and
  wakes every long-polling watcher when one moves; changes made by other
  processes (`meshid policy deny`, `meshid ca revoke`) reach sidecars within
  that interval plus one round trip.
- Once a second the poller also lets `ca.rootkeeper` look at the root: it
  publishes the next root at half the active one's life and lets it activate
  (gated on sidecars) well before expiry; `--no-auto-rotate` turns that off.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import math
import os
import resource
import signal
import socket
import sqlite3
import ssl
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit

import h11
import trio
from cryptography import x509

from ca.api import MAX_BODY, ControlApi, Reply, Request, error
from ca.authority import Authority, utcnow
from ca.limits import SharedFailureLimiter
from ca.metrics import CaMetrics, Live, serve_metrics
from ca.rootkeeper import RootKeeper
from meshid.errors import MeshIdError, StateError, StorageUnavailable
from meshid.ratelimit import FailureLimiter
from meshid.spiffeid import SpiffeId
from meshid.svid import IpAddress, certs_to_pem, generate_key, key_to_pem, leaf_spiffe_id
from meshid.version import SERVER_HEADER, VERSION
from meshid.wire import (
    AUTHORITY_PATH,
    BUNDLE,
    ENROLL,
    HEALTH,
    JWT_SVID,
    RENEW,
    REPORT,
    WATCH,
    WatchQuery,
)

BATCHED_PATHS = (ENROLL, RENEW, REPORT)  # writes: group-committed
MAX_BATCH = 128
WATCH_EXPIRY_MARGIN = 1.0  # seconds: a long poll ends this long before the caller's SVID
SERVER_DIR = "server"
RETRY_AFTER = 5  # seconds a caller is asked to wait when the authority cannot answer
# method -> paths: what HEAD, 405 and Allow are computed from (ca.api routes the rest)
ROUTES: dict[str, tuple[str, ...]] = {
    ENROLL: ("POST",),
    RENEW: ("POST",),
    REPORT: ("POST",),
    BUNDLE: ("GET", "HEAD"),
    WATCH: ("GET", "HEAD"),
    HEALTH: ("GET", "HEAD"),
    JWT_SVID: ("POST",),
}
# RFC 9110's methods: known to this server, so a path that does not take one says 405
KNOWN_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ServerOptions:
    host: str
    port: int
    dns_names: tuple[str, ...] = ()
    ip_addresses: tuple[IpAddress, ...] = ()
    poll_interval: float = 0.2
    watch_timeout: float = 25.0
    handshake_timeout: float = 10.0
    request_timeout: float = 10.0
    idle_timeout: float = 60.0  # between requests, on a connection with a client certificate
    anonymous_idle_timeout: float = 10.0  # between requests, on one without
    max_connections: int = 4096  # anonymous connections (no client certificate), in all
    max_per_source: int = 64  # anonymous connections from one IP address
    max_authenticated: int = 16384  # connections with a client certificate of ours
    max_watches: int = 16384  # long polls parked at once, in all
    max_watches_per_identity: int = 256  # parked by one SPIFFE ID (its replicas share it)
    auto_rotate: bool = True  # prepare and activate the next root by itself (ca.rootlife)
    metrics: tuple[str, int] | None = None  # HOST, PORT of the Prometheus listener (ca.metrics)


@dataclass(slots=True)
class _Credentials:
    context: ssl.SSLContext
    serial: int
    generation: int  # the root that signed it
    bundle_sequence: int
    renew_at: datetime


@dataclass(slots=True)
class ControlPlane:
    authority: Authority
    options: ServerOptions
    log: Callable[..., None]
    clock: Callable[[], datetime] = utcnow
    api: ControlApi = field(init=False)
    bound: tuple[str, int] | None = None
    _creds: _Credentials | None = None
    _db: trio.CapacityLimiter = field(default_factory=lambda: trio.CapacityLimiter(1))
    _changed: trio.Event = field(default_factory=trio.Event)
    _versions: tuple[int, int, int] = (0, 0, 0)
    limiter: FailureLimiter | None = None  # shared by the workers of one server, if given
    _anonymous: dict[trio.CancelScope, None] = field(default_factory=dict)  # oldest first
    _per_source: dict[str, int] = field(default_factory=dict)  # anonymous, by `_source_key`
    _authenticated: int = 0
    _watches: dict[SpiffeId, int] = field(default_factory=dict)
    _watching: int = 0
    _throttle: _Throttle = field(default_factory=lambda: _Throttle(per_second=10))
    _queue: list[_Slot] = field(default_factory=list)
    _queued: trio.Event = field(default_factory=trio.Event)
    root_keeper: RootKeeper = field(init=False)
    metrics: CaMetrics = field(init=False)

    def __post_init__(self) -> None:
        limiter = self.limiter if self.limiter is not None else FailureLimiter(max_failures=5)
        self.api = ControlApi(self.authority, self.clock, time.monotonic, limiter)
        self.root_keeper = RootKeeper(
            self.authority,
            self.log,
            propagation_default(self.authority.svid_ttl),
            auto=self.options.auto_rotate,
        )
        pools = lambda: {"anonymous": len(self._anonymous), "authenticated": self._authenticated}  # noqa: E731
        self.metrics = CaMetrics(self.clock, Live(pools, lambda: self._watching))

    @property
    def identity(self) -> SpiffeId:
        return SpiffeId(self.authority.trust_domain, AUTHORITY_PATH)

    async def _db_call(self, fn: Callable[..., T], *args: Any) -> T:
        return await self.metrics.timed(trio.to_thread.run_sync(fn, *args, limiter=self._db))

    # -- the server's own certificate --

    def _issue_credentials(self) -> _Credentials:
        """Sign a fresh server SVID and build a context around it. Runs in the DB thread."""
        self.authority.advance_roots()
        key = generate_key()
        issued = self.authority.issue(
            self.identity,
            key.public_key(),
            dns_names=self.options.dns_names,
            ip_addresses=self.options.ip_addresses,
            how="issue_authority",
            internal=True,
        )
        generation, _, _ = self.authority.signer()
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        _load_chain_from_memory(context, certs_to_pem(issued.chain) + key_to_pem(key))
        context.load_verify_locations(cadata=issued.bundle.to_pem().decode())
        context.verify_mode = ssl.CERT_OPTIONAL
        leaf = issued.leaf
        lifetime = leaf.not_valid_after_utc - self.clock()
        return _Credentials(
            context=context,
            serial=leaf.serial_number,
            generation=generation,
            bundle_sequence=issued.bundle.sequence,
            renew_at=self.clock() + lifetime / 2,
        )

    def _credentials_stale(self) -> bool:
        creds = self._creds
        if creds is None:
            return True
        if self.clock() >= creds.renew_at:
            return True
        generation, _, _ = self.authority.signer()
        return (
            generation != creds.generation
            or self.authority.bundle().sequence != creds.bundle_sequence
        )

    async def _refresh_credentials(self) -> None:
        stale = await self._db_call(self._credentials_stale)
        if not stale:
            return
        creds = await self._db_call(self._issue_credentials)
        self._creds = creds
        self.log(
            "server_certificate",
            spiffe_id=str(self.identity),
            serial=f"{creds.serial:x}",
            root_generation=creds.generation,
            bundle_sequence=creds.bundle_sequence,
        )

    # -- the version poller --

    async def _poll(self) -> None:
        """Follow the database's versions; a failure is logged when it starts and when it
        ends, not on every tick (a full disk would otherwise fill the log too)."""
        ticks = 0
        failing: str | None = None
        while True:
            await trio.sleep(self.options.poll_interval)
            ticks += 1
            try:
                if ticks % max(1, round(1 / self.options.poll_interval)) == 0:
                    await self._db_call(self.root_keeper.tick)  # logs its own failures
                    await self._db_call(self.metrics.refresh, self.authority)
                    await self._db_call(self.authority.advance_roots)
                    await self._refresh_credentials()
                versions = await self._db_call(self.authority.versions)
            except Exception as exc:  # a full disk, a locked or broken database: try again
                fields = _failure_fields(exc)
                if fields["reason"] != failing:
                    failing = fields["reason"]
                    self.log("poll_failed", **fields)
                continue
            if failing is not None:
                self.log("poll_recovered", reason=failing)
                failing = None
            self._observe(versions)

    def _observe(self, versions: tuple[int, int, int]) -> None:
        """Record the newest versions seen; wake every parked watcher when they move."""
        if versions != self._versions:
            self._versions = versions
            self._changed.set()
            self._changed = trio.Event()

    # -- connections --

    async def serve(
        self,
        sock: socket.socket | None = None,
        *,
        task_status: trio.TaskStatus[tuple[str, int]],
    ) -> None:
        """Serve on `sock` (bound and listening, perhaps shared with other workers)."""
        try:
            await self._refresh_credentials()
            self._versions = await self._db_call(self.authority.versions)
            await self._db_call(self.metrics.refresh, self.authority)
        except Exception as exc:
            if isinstance(exc, MeshIdError) or not _is_storage_failure(exc):
                raise
            # a full or read-only disk: one line for the operator, not a traceback
            raise StorageUnavailable(
                f"cannot start: the authority's state cannot be written ({_describe(exc)})"
            ) from None
        _remove_stale_key_files(self.authority.state_dir / SERVER_DIR)
        if sock is None:
            sock = bind_listener(self.options.host, self.options.port)
        listeners = [trio.SocketListener(trio.socket.from_stdlib_socket(sock))]
        sockname = sock.getsockname()
        self.bound = (str(sockname[0]), int(sockname[1]))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._poll)
            nursery.start_soon(self._batcher)
            self.log(
                "serving",
                listen=f"{self.bound[0]}:{self.bound[1]}",
                trust_domain=self.authority.trust_domain.name,
                spiffe_id=str(self.identity),
                version=VERSION,
            )
            task_status.started(self.bound)
            # Connections run in a nursery of their own; each is its own failure boundary.
            async with trio.open_nursery() as handlers:
                await trio.serve_listeners(self._connection, listeners, handler_nursery=handlers)

    async def _connection(self, tcp: trio.SocketStream) -> None:
        """One connection, start to end; nothing it does can end the server."""
        source = "unknown"
        try:
            try:
                source = str(tcp.socket.getpeername()[0])
            except OSError:
                return  # the peer reset before we looked: nothing to serve
            await self._admitted(tcp, source)
        except Exception as exc:  # a bug or an unforeseen peer: this connection only
            self.log(
                "internal_error", reason="internal_error", source=source, error=type(exc).__name__
            )
        finally:
            await trio.aclose_forcefully(tcp)

    def _log_throttled(self, event: str, **fields: Any) -> None:
        """Log a line a flood could repeat without end: at most a few a second, and the
        next line says how many were left out."""
        suppressed = self._throttle.allow(time.monotonic())
        if suppressed is not None:
            self.log(event, **fields, suppressed=suppressed or None)

    def _shed(self, source: str, reason: str) -> None:
        self._log_throttled("connection_shed", source=source, reason=reason)

    async def _admitted(self, tcp: trio.SocketStream, source: str) -> None:
        key = _source_key(source)
        if self._per_source.get(key, 0) >= self.options.max_per_source:
            self._shed(source, "too_many_connections_from_source")
            return
        if len(self._anonymous) >= self.options.max_connections:
            # Full: the oldest anonymous connection makes room. Refusing the newest
            # instead would let a flood that keeps the pool full lock everyone out,
            # sidecars coming to show their certificate included.
            oldest = next(iter(self._anonymous))
            del self._anonymous[oldest]
            oldest.cancel()
            self._shed(source, "anonymous_pool_full")
        scope = trio.CancelScope()
        self._anonymous[scope] = None
        self._per_source[key] = self._per_source.get(key, 0) + 1
        anonymous = True

        def leave_anonymous_pool() -> None:
            nonlocal anonymous
            if anonymous:
                anonymous = False
                self._anonymous.pop(scope, None)
                left = self._per_source[key] - 1
                if left:
                    self._per_source[key] = left
                else:
                    del self._per_source[key]

        try:
            with scope:
                assert self._creds is not None
                stream = trio.SSLStream(tcp, self._creds.context, server_side=True)
                try:
                    with trio.fail_after(self.options.handshake_timeout):
                        await stream.do_handshake()
                except (trio.TooSlowError, trio.BrokenResourceError, ssl.SSLError, OSError) as exc:
                    slow = isinstance(exc, trio.TooSlowError)
                    self._log_throttled(
                        "handshake_failed",
                        source=source,
                        reason="handshake_timeout" if slow else "tls_error",
                        detail=type(exc).__name__,
                    )
                    return
                der = stream.getpeercert(binary_form=True)
                peer_cert = x509.load_der_x509_certificate(der) if der else None
                if peer_cert is None:
                    await self._serve_http(stream, source, None)
                    return
            if scope.cancelled_caught:
                return
            # The handshake verified the certificate against our bundle: a sidecar.
            leave_anonymous_pool()
            if self._authenticated >= self.options.max_authenticated:
                self._shed(source, "too_many_authenticated_connections")
                return
            self._authenticated += 1
            try:
                await self._serve_http(stream, source, peer_cert)
            finally:
                self._authenticated -= 1
        finally:
            leave_anonymous_pool()

    async def _serve_http(
        self,
        stream: trio.SSLStream[trio.SocketStream],
        source: str,
        cert: x509.Certificate | None,
    ) -> None:
        try:
            await self._http(stream, source, cert)
        except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, OSError):
            pass  # the peer went away
        finally:
            await trio.aclose_forcefully(stream)

    async def _http(
        self, stream: trio.SSLStream[trio.SocketStream], source: str, cert: x509.Certificate | None
    ) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=16 * 1024)
        options = self.options
        idle = options.idle_timeout if cert is not None else options.anonymous_idle_timeout
        while True:
            cycle = _Cycle()
            try:
                body = await self._read_request(stream, conn, idle, cycle)
            except h11.RemoteProtocolError as exc:
                reply = error(exc.error_status_hint, "bad_request", str(exc))
            except trio.TooSlowError:
                reply = error(408, "request_timeout", "request not received in time")
            except _BodyTooLarge:
                reply = error(413, "body_too_large", f"request body over {MAX_BODY} bytes")
            else:
                if cycle.request is None:
                    return  # the client closed between requests
                reply = await self._reply(cycle.request, body, source, cert)
            # HEAD is answered without a body even when the request failed half-way
            await self._send(stream, conn, reply, head=cycle.method == "HEAD")
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()

    async def _reply(
        self, request: h11.Request, body: bytes, source: str, cert: x509.Certificate | None
    ) -> Reply:
        method = request.method.decode("ascii", "replace")
        try:
            target = urlsplit(request.target.decode("ascii", "replace"))
        except ValueError:  # e.g. "//[": an IPv6 authority never closed
            return error(400, "bad_request", "request target cannot be parsed")
        req = Request(
            method="GET" if method == "HEAD" else method,
            path=target.path,
            query=dict(parse_qsl(target.query)),
            body=body,
            source=source,
            peer_cert=cert,
        )
        reply = _method_reply(method, req.path) or await self._answer(req)
        self.metrics.observe_reply(req.path, reply.status, reply.body.get("error"))
        if reply.status >= 400 or req.path == ENROLL:  # renewals: see the audit log
            self.log(
                "request",
                method=method[:16],
                path=req.path[:256],
                source=source,
                status=reply.status,
                reason=reply.body.get("error"),
                spiffe_id=_who(reply, cert),
                serial=reply.body.get("serial"),
            )
        return reply

    async def _answer(self, req: Request) -> Reply:
        """The reply to one request; the authority failing costs this request a 503."""
        try:
            return _retry_later(await self._dispatch(req))
        except Exception as exc:
            fields = _failure_fields(exc)
            self.log("request_failed", method=req.method, path=req.path, **fields)
            return _unavailable(fields["reason"])

    async def _dispatch(self, req: Request) -> Reply:
        if req.method == "GET" and req.path == WATCH:
            reply, seen = await self._db_call(self.api.watch_check, req)
            if reply is not None:
                return reply
            self._observe(seen)  # the database may be ahead of the poller
            assert req.peer_cert is not None  # watch_check refused the anonymous
            caller = leaf_spiffe_id(req.peer_cert)
            if (
                self._watching >= self.options.max_watches
                or self._watches.get(caller, 0) >= self.options.max_watches_per_identity
            ):
                # Not an unchanged feed at once: the sidecar would ask again at once, in a loop.
                return error(
                    429,
                    "too_many_watches",
                    "too many long polls are parked; try again later",
                    retry_after=str(RETRY_AFTER),
                )
            asked = WatchQuery.parse(req.query).wait  # watch_check read the versions already
            wait = min(self.options.watch_timeout if asked is None else asked, 60.0)
            # Answer while the caller's certificate is still good: the reply checks the
            # caller again, and a watch parked past that expiry would end in an error
            # the sidecar backs off from, missing changes meanwhile.
            left = (req.peer_cert.not_valid_after_utc - self.clock()).total_seconds()
            wait = min(wait, max(0.0, left - WATCH_EXPIRY_MARGIN))
            self._watching += 1
            self._watches[caller] = self._watches.get(caller, 0) + 1
            try:
                with trio.move_on_after(wait):
                    while self._versions == seen:
                        await self._changed.wait()
            finally:
                self._watching -= 1
                if self._watches[caller] <= 1:
                    del self._watches[caller]
                else:
                    self._watches[caller] -= 1
        if req.method == "POST" and req.path in BATCHED_PATHS:
            return await self._signed(req)
        return await self._db_call(self.api.handle, req)

    async def _signed(self, req: Request) -> Reply:
        """Queue a signing request; the batcher signs everything queued in one transaction."""
        slot = _Slot(req)
        self._queue.append(slot)
        self._queued.set()
        await slot.done.wait()
        assert slot.reply is not None
        return slot.reply

    async def _batcher(self) -> None:
        while True:
            await self._queued.wait()
            self._queued = trio.Event()
            while self._queue:
                batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
                with trio.CancelScope(shield=True):  # callers are waiting on every slot
                    try:
                        replies = await self._db_call(
                            self.api.handle_batch, [slot.request for slot in batch]
                        )
                    except Exception as exc:  # the batch is lost, not the server: retry later
                        fields = _failure_fields(exc)
                        self.log("batch_failed", requests=len(batch), **fields)
                        replies = [_unavailable(fields["reason"])] * len(batch)
                for slot, reply in zip(batch, replies, strict=True):
                    slot.reply = _retry_later(reply)
                    slot.done.set()

    async def _read_request(
        self,
        stream: trio.SSLStream[trio.SocketStream],
        conn: h11.Connection,
        idle: float,
        cycle: _Cycle,
    ) -> bytes:
        """The next request's body; its head goes into `cycle` as soon as it is read."""
        request: h11.Request | None = None
        body = bytearray()
        # Waiting for the first byte of a request is idle time; once it starts it must finish.
        deadline = trio.current_time() + idle
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                with trio.fail_at(deadline):
                    data = await stream.receive_some(16384)
                conn.receive_data(bytes(data))
                if request is None and data:
                    deadline = min(deadline, trio.current_time() + self.options.request_timeout)
                continue
            if isinstance(event, h11.Request):
                request = cycle.request = event
                length = _content_length(event.headers)
                if length is not None and length > MAX_BODY:
                    raise _BodyTooLarge
                deadline = min(deadline, trio.current_time() + self.options.request_timeout)
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > MAX_BODY:
                    raise _BodyTooLarge
            elif isinstance(event, h11.EndOfMessage):
                return bytes(body)
            elif isinstance(event, h11.ConnectionClosed):
                cycle.request = None
                return b""

    async def _send(
        self,
        stream: trio.SSLStream[trio.SocketStream],
        conn: h11.Connection,
        reply: Reply,
        *,
        head: bool = False,
    ) -> None:
        """Send `reply` (headers only, if the request was HEAD) within `request_timeout`."""
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        payload = reply.encode()
        headers = [
            ("content-type", "application/json"),
            ("content-length", str(len(payload))),
            ("server", SERVER_HEADER),
            *reply.headers,
        ]
        if reply.status >= 400 and reply.status not in (401, 403, 404, 405):
            headers.append(("connection", "close"))
        data = conn.send(h11.Response(status_code=reply.status, headers=headers)) or b""
        if not head:  # HEAD: the headers GET would have, content-length included
            data += conn.send(h11.Data(data=payload)) or b""
        data += conn.send(h11.EndOfMessage()) or b""
        with trio.fail_after(self.options.request_timeout):  # a peer that never reads
            await stream.send_all(data)


@dataclass(slots=True)
class _Throttle:
    """At most `per_second` events a second; counts the ones it turns away. Pure."""

    per_second: int
    _window: float = -math.inf
    _used: int = 0
    _dropped: int = 0

    def allow(self, now: float) -> int | None:
        """None to drop this one; else how many were dropped since the last allowed."""
        if now - self._window >= 1.0:
            self._window, self._used = now, 0
        if self._used >= self.per_second:
            self._dropped += 1
            return None
        self._used += 1
        dropped, self._dropped = self._dropped, 0
        return dropped


@dataclass(slots=True)
class _Cycle:
    """What is known of the request being read: enough to answer even a broken one right."""

    request: h11.Request | None = None

    @property
    def method(self) -> str | None:
        return None if self.request is None else self.request.method.decode("ascii", "replace")


@dataclass(eq=False, slots=True)
class _Slot:
    request: Request
    reply: Reply | None = None
    done: trio.Event = field(default_factory=trio.Event)


class _BodyTooLarge(Exception):
    pass


def _who(reply: Reply, cert: x509.Certificate | None) -> str | None:
    """The identity a request was about, for its log line: the one issued, or the caller's.

    Never the token: a failed enrollment names no one.
    """
    issued = reply.body.get("spiffe_id")
    if isinstance(issued, str):
        return issued
    if cert is None:
        return None
    try:
        return str(leaf_spiffe_id(cert))
    except MeshIdError:
        return None


def _source_key(address: str) -> str:
    """What the per-source cap counts by: an IPv4 address, or an IPv6 /64.

    One IPv6 host usually holds a whole /64, and would otherwise have 2**64
    sources to spread a flood over.
    """
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def _method_reply(method: str, path: str) -> Reply | None:
    """405 (with Allow) or 501 for a method the path or the server does not take."""
    allowed = ROUTES.get(path)
    if allowed is None or method in allowed:
        return None  # an unknown path is ca.api's 404
    if method not in KNOWN_METHODS:
        return error(501, "not_implemented", "this server does not implement that method")
    return error(
        405, "method_not_allowed", f"{method} is not allowed here", allow=", ".join(allowed)
    )


_STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EIO})


def _is_storage_failure(exc: BaseException) -> bool:
    if isinstance(exc, StorageUnavailable | sqlite3.Error):
        return True
    return isinstance(exc, OSError) and exc.errno in _STORAGE_ERRNOS


def _describe(exc: BaseException) -> str:
    """What failed, in words that hold no secret: ours, or SQLite's, or the OS's."""
    if isinstance(exc, MeshIdError):
        return exc.message
    if isinstance(exc, sqlite3.Error):
        return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return type(exc).__name__


def _failure_fields(exc: BaseException) -> dict[str, str]:
    """Log fields for an exception the authority raised: a reason, its type, its words."""
    if isinstance(exc, MeshIdError):
        reason = exc.reason
    else:
        reason = "storage_unavailable" if _is_storage_failure(exc) else "internal_error"
    return {"reason": reason, "error": type(exc).__name__, "detail": _describe(exc)}


def _retry_later(reply: Reply) -> Reply:
    """A reply that says the storage failed is a 503 with Retry-After, whoever wrote it."""
    if reply.body.get("error") != "storage_unavailable" or reply.status == 503:
        return reply
    return _unavailable("storage_unavailable")


def _unavailable(reason: str) -> Reply:
    return error(
        503,
        reason,
        "the authority cannot answer now; try again later",
        retry_after=str(RETRY_AFTER),
    )


def _load_chain_from_memory(context: ssl.SSLContext, pem: bytes) -> None:
    """Load a certificate chain and its key without writing the key to any disk.

    The stdlib loads a key only from a path. An anonymous in-memory file
    (``memfd_create``), reached through ``/proc/self/fd``, is such a path: the key
    never touches the state directory, so nothing is left behind if the process
    is killed here, and a full or read-only disk does not stop the server.
    """
    fd = os.memfd_create("meshid-server-key", os.MFD_CLOEXEC)
    try:
        os.fchmod(fd, 0o600)
        view = memoryview(pem)
        while view:
            view = view[os.write(fd, view) :]
        context.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def _remove_stale_key_files(directory: Path) -> None:
    """Remove server key files an older version wrote and a killed process left behind."""
    with contextlib.suppress(OSError):
        for path in directory.glob(".*-*.key"):
            with contextlib.suppress(OSError):
                path.unlink()
        for path in directory.glob(".*-*.pem"):
            with contextlib.suppress(OSError):
                path.unlink()


def _content_length(headers: Sequence[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def bind_listener(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(4096)
    except OSError as exc:
        sock.close()
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if exc.errno == errno.EADDRINUSE:
            raise StateError(
                f"cannot listen on {where}: another process is listening there (another "
                "meshid ca serve?); stop it, or give another --listen",
                reason="address_in_use",
            ) from None
        raise StateError(
            f"cannot listen on {where}: {exc.strerror}", reason="listen_failed"
        ) from None
    return sock


def _serve_one(
    open_authority: Callable[[], Authority],
    options: ServerOptions,
    sock: socket.socket,
    log: Callable[..., None],
    limiter: FailureLimiter | None = None,
    metrics_sock: socket.socket | None = None,
) -> None:
    """One worker: its own database connection, its own event loop, the shared socket."""
    authority = open_authority()
    plane = ControlPlane(authority, options, log=log, limiter=limiter)

    async def main() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                await nursery.start(plane.serve, sock)
                if metrics_sock is not None:
                    await nursery.start(serve_metrics, metrics_sock, plane.metrics, log)
                async for signum in signals:
                    log("stopping", signal=signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    break

    try:
        trio.run(main)
    except BaseExceptionGroup as group:
        matched, _ = group.split(MeshIdError)
        if matched is None:
            raise
        first: BaseException = matched.exceptions[0]
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from None
    finally:
        authority.close()


FILE_RESERVE = 64  # descriptors beside connections: the database, listeners, logs


def _raise_file_limit(options: ServerOptions, log: Callable[..., None]) -> None:
    """Lift the soft descriptor limit to what the connection caps need, if the hard one allows.

    Past the limit, accept() fails and trio waits and retries: new connections
    queue in the kernel, and the anonymous pool's make-room rule never gets to
    run. That is worth a log line; a limit that holds the anonymous pool but
    not every authenticated connection is not (sidecars are few next to floods).
    """
    need = options.max_connections + options.max_authenticated + FILE_RESERVE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= need:
        return
    target = need if hard == resource.RLIM_INFINITY else min(need, hard)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    if soft < options.max_connections + FILE_RESERVE:
        log("file_limit", reason="file_limit_low", limit=soft, needed=need)


def run_server(
    open_authority: Callable[[], Authority],
    options: ServerOptions,
    log: Callable[..., None],
    workers: int = 1,
) -> int:
    """Serve until SIGTERM/SIGINT; returns the exit status.

    With several workers, the port is bound once and each worker is a forked
    process with its own database connection and event loop (Python runs one
    thread at a time, so processes are how the control plane uses more than
    one core). The parent only forwards signals and watches: if a worker
    dies, the others are stopped and the parent exits non-zero, for the
    service manager to restart the whole set.
    """
    if workers <= 1:
        sock = bind_listener(options.host, options.port)
        [metrics_sock] = _bind_metrics(options, 1)
        _raise_file_limit(options, log)
        _serve_one(open_authority, options, sock, log, metrics_sock=metrics_sock)
        return 0
    # One listening socket per worker in a SO_REUSEPORT group: the kernel spreads new
    # connections across them evenly (one shared socket let one worker take most).
    first = bind_listener(options.host, options.port, reuse_port=True)
    port = int(first.getsockname()[1])
    socks = [first]
    try:
        socks += [bind_listener(options.host, port, reuse_port=True) for _ in range(workers - 1)]
    except MeshIdError:
        for sock in socks:
            sock.close()
        raise
    metrics_socks = _bind_metrics(options, workers)
    _raise_file_limit(options, log)
    # Created before the fork, so every worker counts enrollment failures in one table.
    limiter = SharedFailureLimiter(max_failures=5)
    children: dict[int, int] = {}
    for index in range(workers):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child, which never returns
            status = 1
            try:
                for other, sock in enumerate(socks):
                    if other != index:
                        sock.close()
                for other, msock in enumerate(metrics_socks):
                    if other != index and msock is not None:
                        msock.close()
                _serve_one(
                    open_authority,
                    options,
                    socks[index],
                    lambda event, i=index, **f: log(event, worker=i, **f),
                    limiter,
                    metrics_socks[index],
                )
                status = 0
            except MeshIdError as exc:
                log("worker_failed", worker=index, reason=exc.reason, detail=exc.message)
            except BaseException:
                traceback.print_exc()  # a bug: show it; the parent stops the set
            finally:
                os._exit(status)
        children[pid] = index
    for sock in socks:
        sock.close()
    for msock in metrics_socks:
        if msock is not None:
            msock.close()
    stopping = False
    status = 0

    def stop_all(signum: int = signal.SIGTERM, _frame: object = None) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop_all)
    signal.signal(signal.SIGINT, stop_all)
    while children:
        try:
            pid, wait_status = os.wait()
        except ChildProcessError:
            break
        index = children.pop(pid)
        code = os.waitstatus_to_exitcode(wait_status)
        if not stopping:
            log("worker_died", worker=index, exit_code=code)
            status = 1
            stop_all()
    return status


def parse_listen(text: str, flag: str = "--listen") -> tuple[str, int]:
    """HOST:PORT or [V6]:PORT."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise StateError(f"{flag} {text!r}: expected HOST:PORT", reason="invalid_address")
    host = host.strip("[]")
    if not host:
        raise StateError(f"{flag} {text!r}: expected HOST:PORT", reason="invalid_address")
    return host, int(port)


def _bind_metrics(options: ServerOptions, workers: int) -> list[socket.socket | None]:
    """One metrics socket per worker, on consecutive ports (port 0: each its own), or none."""
    if options.metrics is None:
        return [None] * workers
    host, port = options.metrics
    if port and port + workers - 1 > 65535:
        raise StateError(
            f"--metrics: ports {port}..{port + workers - 1} (one per worker) pass 65535",
            reason="invalid_address",
        )
    socks: list[socket.socket | None] = []
    try:
        for index in range(workers):
            socks.append(bind_listener(host, port + index if port else 0))
    except MeshIdError:
        for sock in socks:
            if sock is not None:
                sock.close()
        raise
    return socks


def default_names(host: str) -> tuple[tuple[str, ...], tuple[IpAddress, ...]]:
    """SANs for the listen host when the operator named none: its IP, or its DNS name."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return (host,), ()
    if ip.is_unspecified:
        return ("localhost",), (ipaddress.ip_address("127.0.0.1"),)
    return (), (ip,)


def propagation_default(svid_ttl: timedelta) -> timedelta:
    """Long enough for every watcher to hear of the new root a few times over."""
    return max(timedelta(seconds=10), min(svid_ttl / 2, timedelta(minutes=5)))
