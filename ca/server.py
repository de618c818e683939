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
  408) and its body may not exceed 64 KiB (413).
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
import ipaddress
import math
import os
import secrets
import signal
import socket
import ssl
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit

import h11
import trio
from cryptography import x509

from ca.api import MAX_BODY, ControlApi, Reply, Request, error
from ca.authority import Authority, utcnow
from ca.rootkeeper import RootKeeper
from meshid.errors import MeshIdError, StateError
from meshid.files import write_atomic
from meshid.ratelimit import FailureLimiter
from meshid.spiffeid import SpiffeId
from meshid.svid import IpAddress, certs_to_pem, generate_key, key_to_pem

AUTHORITY_PATH = "/meshid/authority"
BATCHED_PATHS = ("/v1/enroll", "/v1/renew", "/v1/report")  # writes: group-committed
MAX_BATCH = 128
WATCH_EXPIRY_MARGIN = 1.0  # seconds: a long poll ends this long before the caller's SVID
SERVER_DIR = "server"
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
    idle_timeout: float = 60.0
    max_connections: int = 4096
    auto_rotate: bool = True  # prepare and activate the next root by itself (ca.rootlife)


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
    _connections: int = 0
    _queue: list[_Slot] = field(default_factory=list)
    _queued: trio.Event = field(default_factory=trio.Event)
    root_keeper: RootKeeper = field(init=False)

    def __post_init__(self) -> None:
        self.api = ControlApi(
            self.authority, self.clock, time.monotonic, FailureLimiter(max_failures=5)
        )
        self.root_keeper = RootKeeper(
            self.authority,
            self.log,
            propagation_default(self.authority.svid_ttl),
            auto=self.options.auto_rotate,
        )

    @property
    def identity(self) -> SpiffeId:
        return SpiffeId(self.authority.trust_domain, AUTHORITY_PATH)

    async def _db_call(self, fn: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(fn, *args, limiter=self._db)

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
        directory = self.authority.state_dir / SERVER_DIR
        directory.mkdir(mode=0o700, exist_ok=True)
        # The stdlib loads a key only from a file. Each worker writes its own pair,
        # loads it, and removes it: the key lives on in memory only.
        stem = f".{os.getpid()}-{secrets.token_hex(4)}"
        cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
        try:
            write_atomic(key_path, key_to_pem(key), mode=0o600)
            write_atomic(cert_path, certs_to_pem(issued.chain))
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.minimum_version = ssl.TLSVersion.TLSv1_3
            context.load_cert_chain(cert_path, key_path)
        finally:
            key_path.unlink(missing_ok=True)
            cert_path.unlink(missing_ok=True)
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
        ticks = 0
        while True:
            await trio.sleep(self.options.poll_interval)
            ticks += 1
            try:
                if ticks % max(1, round(1 / self.options.poll_interval)) == 0:
                    await self._db_call(self.root_keeper.tick)  # logs its own failures
                    await self._db_call(self.authority.advance_roots)
                    await self._refresh_credentials()
                versions = await self._db_call(self.authority.versions)
            except MeshIdError as exc:
                self.log("poll_failed", reason=exc.reason, detail=exc.message)
                continue
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
        await self._refresh_credentials()
        self._versions = await self._db_call(self.authority.versions)
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
            )
            task_status.started(self.bound)
            await trio.serve_listeners(self._connection, listeners)

    async def _connection(self, tcp: trio.SocketStream) -> None:
        peer = tcp.socket.getpeername()
        source = str(peer[0])
        if self._connections >= self.options.max_connections:
            await tcp.aclose()
            return
        self._connections += 1
        try:
            assert self._creds is not None
            stream = trio.SSLStream(tcp, self._creds.context, server_side=True)
            try:
                with trio.fail_after(self.options.handshake_timeout):
                    await stream.do_handshake()
            except (trio.TooSlowError, trio.BrokenResourceError, ssl.SSLError, OSError) as exc:
                self.log("handshake_failed", source=source, detail=type(exc).__name__)
                await trio.aclose_forcefully(tcp)
                return
            der = stream.getpeercert(binary_form=True)
            peer_cert = x509.load_der_x509_certificate(der) if der else None
            try:
                await self._http(stream, source, peer_cert)
            except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, OSError):
                pass
            finally:
                await trio.aclose_forcefully(stream)
        finally:
            self._connections -= 1

    async def _http(
        self, stream: trio.SSLStream[trio.SocketStream], source: str, cert: x509.Certificate | None
    ) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=16 * 1024)
        while True:
            try:
                request, body = await self._read_request(stream, conn)
            except h11.RemoteProtocolError as exc:
                await self._send(
                    stream, conn, error(exc.error_status_hint, "bad_request", str(exc))
                )
                return
            except trio.TooSlowError:
                await self._send(
                    stream, conn, error(408, "request_timeout", "request not received in time")
                )
                return
            except _BodyTooLarge:
                await self._send(
                    stream,
                    conn,
                    error(413, "body_too_large", f"request body over {MAX_BODY} bytes"),
                )
                return
            if request is None:
                return  # the client closed between requests
            target = urlsplit(request.target.decode("ascii", "replace"))
            req = Request(
                method=request.method.decode("ascii", "replace"),
                path=target.path,
                query=dict(parse_qsl(target.query)),
                body=body,
                source=source,
                peer_cert=cert,
            )
            reply = await self._dispatch(req)
            if reply.status >= 400 or req.path == "/v1/enroll":  # renewals: see the audit log
                self.log(
                    "request",
                    method=req.method,
                    path=req.path,
                    source=source,
                    status=reply.status,
                    reason=reply.body.get("error"),
                )
            await self._send(stream, conn, reply)
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()

    async def _dispatch(self, req: Request) -> Reply:
        if req.method == "GET" and req.path == "/v1/watch":
            reply, seen = await self._db_call(self.api.watch_check, req)
            if reply is not None:
                return reply
            self._observe(seen)  # the database may be ahead of the poller
            try:
                wait = min(float(req.query.get("wait", self.options.watch_timeout)), 60.0)
            except ValueError:
                wait = self.options.watch_timeout
            if not math.isfinite(wait) or wait < 0:
                wait = self.options.watch_timeout
            if req.peer_cert is not None:
                # Answer while the caller's certificate is still good: the reply checks the
                # caller again, and a watch parked past that expiry would end in an error
                # the sidecar backs off from, missing changes meanwhile.
                left = (req.peer_cert.not_valid_after_utc - self.clock()).total_seconds()
                wait = min(wait, max(0.0, left - WATCH_EXPIRY_MARGIN))
            with trio.move_on_after(wait):
                while self._versions == seen:
                    await self._changed.wait()
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
                    except MeshIdError as exc:
                        replies = [error(503, exc.reason, exc.message)] * len(batch)
                for slot, reply in zip(batch, replies, strict=True):
                    slot.reply = reply
                    slot.done.set()

    async def _read_request(
        self, stream: trio.SSLStream[trio.SocketStream], conn: h11.Connection
    ) -> tuple[h11.Request | None, bytes]:
        request: h11.Request | None = None
        body = bytearray()
        # Waiting for the first byte of a request is idle time; once it starts it must finish.
        deadline = trio.current_time() + self.options.idle_timeout
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
                request = event
                length = _content_length(event.headers)
                if length is not None and length > MAX_BODY:
                    raise _BodyTooLarge
                deadline = min(deadline, trio.current_time() + self.options.request_timeout)
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > MAX_BODY:
                    raise _BodyTooLarge
            elif isinstance(event, h11.EndOfMessage):
                return request, bytes(body)
            elif isinstance(event, h11.ConnectionClosed):
                return None, b""

    @staticmethod
    async def _send(
        stream: trio.SSLStream[trio.SocketStream], conn: h11.Connection, reply: Reply
    ) -> None:
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        payload = reply.encode()
        headers = [
            ("content-type", "application/json"),
            ("content-length", str(len(payload))),
            *reply.headers,
        ]
        if reply.status >= 400 and reply.status not in (401, 403, 404, 405):
            headers.append(("connection", "close"))
        data = conn.send(h11.Response(status_code=reply.status, headers=headers))
        data = (data or b"") + (conn.send(h11.Data(data=payload)) or b"")
        data += conn.send(h11.EndOfMessage()) or b""
        await stream.send_all(data)


@dataclass(eq=False, slots=True)
class _Slot:
    request: Request
    reply: Reply | None = None
    done: trio.Event = field(default_factory=trio.Event)


class _BodyTooLarge(Exception):
    pass


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
        raise StateError(
            f"cannot listen on {host}:{port}: {exc.strerror}", reason="listen_failed"
        ) from None
    return sock


def _serve_one(
    open_authority: Callable[[], Authority],
    options: ServerOptions,
    sock: socket.socket,
    log: Callable[..., None],
) -> None:
    """One worker: its own database connection, its own event loop, the shared socket."""
    authority = open_authority()
    plane = ControlPlane(authority, options, log=log)

    async def main() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                await nursery.start(plane.serve, sock)
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
        _serve_one(open_authority, options, bind_listener(options.host, options.port), log)
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
    children: dict[int, int] = {}
    for index in range(workers):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child, which never returns
            status = 1
            try:
                for other, sock in enumerate(socks):
                    if other != index:
                        sock.close()
                _serve_one(
                    open_authority,
                    options,
                    socks[index],
                    lambda event, i=index, **f: log(event, worker=i, **f),
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


def parse_listen(text: str) -> tuple[str, int]:
    """HOST:PORT or [V6]:PORT."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise StateError(f"--listen {text!r}: expected HOST:PORT", reason="invalid_address")
    host = host.strip("[]")
    if not host:
        raise StateError(f"--listen {text!r}: expected HOST:PORT", reason="invalid_address")
    return host, int(port)


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
