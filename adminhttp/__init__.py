"""A hardened plain-HTTP/1.1 (h11) listener for probes and Prometheus, GET and HEAD only.

The sidecar's admin listener (/healthz, /readyz, /metrics, /svid) and the
authority's metrics listener (`meshid ca serve --metrics`) are this one server
with different routers. It lives in a package of its own because `ca` and
`sidecar` never import each other and the shared kernel (`meshid`) does no I/O.

Meant for loopback or a pod-local probe port: it exposes no secret, only state
an operator or Prometheus needs. It runs in its process's main nursery, so the
one thing it must never do is let an exception out: a probe, a scanner or a
hostile client costs one connection at most, never the process.

Theory of operation
-------------------
`answer` is the pure part: a method and a target in, the status, headers and
body out. The router is only ever asked about GET; HEAD is the GET's answer
without its body (h11 would refuse to send a body on a HEAD response); other
methods HTTP knows get 405 with `Allow`, methods it does not know 501, and
anything h11 cannot parse 400 (or 431 for an oversized head).

The shell around it, per connection:

- the whole of one request - head, body and our response - runs under one
  deadline (`request_timeout`); a connection kept alive between requests is
  closed after `idle_timeout` without a new one;
- a body is read (these paths ignore it) up to `max_request_body`; past that
  the answer is 413 and the connection is closed rather than drained;
- any unexpected exception (a router that raises, a bug here) is logged once as
  `internal_error` with its type only, answered 500 if nothing was sent yet,
  and closes that connection only. `trio.Cancelled` is a `BaseException` and
  is never caught.

Around all connections, a `Gate` counts open connections in total and per
source address; past either cap a new connection is closed as soon as it is
accepted, before a byte is read. Refusals and failed accepts (out of
descriptors) are logged at most once a second per reason, with a count of the
lines held back.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from http import HTTPStatus

import h11
import trio
from prometheus_client import CollectorRegistry, Gauge, PlatformCollector, ProcessCollector

from meshid.errors import MeshIdError
from meshid.events import EventLog
from meshid.version import SERVER_HEADER, VERSION

MAX_CONNECTIONS = 64
MAX_PER_SOURCE = 16
REQUEST_TIMEOUT = 10.0
IDLE_TIMEOUT = 5.0
MAX_REQUEST_HEAD = 16 * 1024
MAX_REQUEST_BODY = 1024
RECEIVE_SIZE = 16 * 1024
ACCEPT_BACKOFF = 0.1
LOG_INTERVAL = 1.0

ALLOW = "GET, HEAD"
# Methods HTTP defines (RFC 9110, plus PATCH): these get 405, any other token 501.
KNOWN_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)
_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"


Router = Callable[[str, str], Response]


@dataclass(frozen=True, slots=True)
class AdminLimits:
    """What one admin listener will spend on its clients; the defaults are the production ones."""

    max_connections: int = MAX_CONNECTIONS
    max_per_source: int = MAX_PER_SOURCE
    request_timeout: float = REQUEST_TIMEOUT
    idle_timeout: float = IDLE_TIMEOUT
    max_request_head: int = MAX_REQUEST_HEAD
    max_request_body: int = MAX_REQUEST_BODY


@dataclass(frozen=True, slots=True)
class Reply:
    """A response about to be sent: `send_body` is False for HEAD (the length still says it)."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes
    send_body: bool = True


# -- the pure part -------------------------------------------------------------


def plain(status: int, text: str, *, close: bool = False, allow: bool = False) -> Reply:
    body = text.encode() + b"\n"
    headers = [
        ("content-type", "text/plain; charset=utf-8"),
        ("content-length", str(len(body))),
        ("cache-control", "no-store"),
    ]
    if allow:
        headers.append(("allow", ALLOW))
    if close:
        headers.append(("connection", "close"))
    return Reply(status, tuple(headers), body)


def answer(method: str, target: str, route: Router) -> Reply:
    """The reply to one complete request; calls `route` for GET and HEAD only."""
    if method not in ("GET", "HEAD"):
        if method in KNOWN_METHODS:
            return plain(405, "method not allowed", allow=True)
        return plain(501, "not implemented", allow=True)
    reply = route("GET", target.split("?", 1)[0])
    headers = (
        ("content-type", reply.content_type),
        ("content-length", str(len(reply.body))),
        ("cache-control", "no-store"),
    )
    return Reply(reply.status, headers, reply.body, send_body=method == "GET")


def declared_length(request: h11.Request) -> int | None:
    """The Content-Length a request announced (h11 has checked it is one valid number)."""
    for name, value in request.headers:
        if name == b"content-length":
            return int(value)
    return None


class Gate:
    """Open connections, in total and per source: whether one more may come in."""

    def __init__(self, max_connections: int, max_per_source: int) -> None:
        self._max_total = max_connections
        self._max_source = max_per_source
        self._total = 0
        self._by_source: dict[str, int] = {}

    def admit(self, source: str) -> str | None:
        """Count the connection in and return None, or return why it is refused."""
        if self._total >= self._max_total:
            return "connection_limit"
        held = self._by_source.get(source, 0)
        if held >= self._max_source:
            return "source_limit"
        self._total += 1
        self._by_source[source] = held + 1
        return None

    def release(self, source: str) -> None:
        self._total -= 1
        left = self._by_source[source] - 1
        if left:
            self._by_source[source] = left
        else:
            del self._by_source[source]

    @property
    def open(self) -> int:
        return self._total


class Throttle:
    """At most one line per `interval` per key; says how many were held back meanwhile."""

    def __init__(self, clock: Callable[[], float], interval: float = LOG_INTERVAL) -> None:
        self._clock = clock
        self._interval = interval
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def allow(self, key: str) -> int | None:
        """None to hold the line back, else how many lines were held back before it."""
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self._interval:
            self._held[key] = self._held.get(key, 0) + 1
            return None
        self._last[key] = now
        return self._held.pop(key, 0)


def register_process_metrics(registry: CollectorRegistry, component: str) -> None:
    """`process_*`, `python_info` and `meshid_build_info{version,component}` in `registry`."""
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    Gauge(
        "meshid_build_info",
        "Always 1; the labels say which meshid version this process runs",
        ["version", "component"],
        registry=registry,
    ).labels(VERSION, component).set(1)


# -- the trio shell ------------------------------------------------------------


class _Closed(Exception):
    """The peer is gone; nothing more to read or send on this connection."""


class _Client:
    """One admin connection: the socket, its h11 state, and what the current request asked."""

    def __init__(self, stream: trio.SocketStream, limits: AdminLimits) -> None:
        self.stream = stream
        self.last_words = limits.request_timeout
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_request_head)
        self.head = False  # a response to HEAD carries no body, whatever it is

    async def next_event(self) -> object:
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            self.conn.receive_data(await self.stream.receive_some(RECEIVE_SIZE))

    async def send(self, reply: Reply) -> None:
        conn = self.conn
        status = reply.status
        out = bytearray(
            conn.send(
                h11.Response(
                    status_code=status,
                    headers=[*reply.headers, ("server", SERVER_HEADER)],
                    reason=_phrase(status),
                )
            )
            or b""
        )
        if reply.send_body and reply.body and not self.head:
            out += conn.send(h11.Data(data=reply.body)) or b""
        out += conn.send(h11.EndOfMessage()) or b""
        await self.stream.send_all(bytes(out))

    async def send_last(self, reply: Reply) -> None:
        """Best effort, bounded: tell the client why we are closing, if it can still be told."""
        if self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        with (
            trio.move_on_after(self.last_words),
            contextlib.suppress(
                h11.LocalProtocolError, trio.BrokenResourceError, trio.ClosedResourceError
            ),
        ):
            await self.send(reply)


class AdminServer:
    """Accepts admin connections and serves each in its own failure boundary."""

    def __init__(self, route: Router, limits: AdminLimits, events: EventLog) -> None:
        self.route = route
        self.limits = limits
        self.events = events
        self.gate = Gate(limits.max_connections, limits.max_per_source)
        self._throttle = Throttle(trio.current_time)

    def _log_throttled(self, event: str, reason: str, **fields: object) -> None:
        held = self._throttle.allow(f"{event}:{reason}")
        if held is not None:
            self.events.emit(event, reason=reason, suppressed=held or None, **fields)

    async def accept_loop(
        self, listener: trio.abc.Listener[trio.SocketStream], handlers: trio.Nursery
    ) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno not in _CAPACITY_ERRNOS:
                    raise
                self._log_throttled("accept_failed", "resource_exhausted", listener="admin")
                await trio.sleep(ACCEPT_BACKOFF)  # let connections close before accepting more
                continue
            try:
                source = str(stream.socket.getpeername()[0])
            except OSError:  # gone before we looked
                await trio.aclose_forcefully(stream)
                continue
            refused = self.gate.admit(source)
            if refused is not None:
                await trio.aclose_forcefully(stream)
                self._log_throttled("admin_refused", refused, peer_addr=source)
                continue
            handlers.start_soon(self._connection, stream, source)

    async def _connection(self, stream: trio.SocketStream, source: str) -> None:
        """One connection's failure boundary: nothing but Cancelled gets out of here."""
        client = _Client(stream, self.limits)
        try:
            await self._serve(client)
        except h11.RemoteProtocolError as exc:
            await client.send_last(plain(exc.error_status_hint, "bad request"))
        except (_Closed, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception as exc:  # a bug, or a router that raised: this connection only
            self.events.emit(
                "admin_error", reason="internal_error", detail=type(exc).__name__, peer_addr=source
            )
            await client.send_last(plain(500, "internal error", close=True))
        finally:
            self.gate.release(source)
            await trio.aclose_forcefully(stream)

    async def _serve(self, client: _Client) -> None:
        limits = self.limits
        first = True
        while True:
            if not first and client.conn.trailing_data == (b"", False):
                with trio.move_on_after(limits.idle_timeout) as idle:
                    client.conn.receive_data(await client.stream.receive_some(RECEIVE_SIZE))
                if idle.cancelled_caught:
                    return  # kept alive, but idle too long
            first = False
            again = False
            with trio.move_on_after(limits.request_timeout):
                again = await self._one_request(client)
            if not again:
                return  # answered with close, or out of time for this request
            client.conn.start_next_cycle()

    async def _one_request(self, client: _Client) -> bool:
        """Read one request, answer it; True if the connection may carry another."""
        client.head = False
        request = await client.next_event()
        if not isinstance(request, h11.Request):
            raise _Closed  # ConnectionClosed: the only other event possible between requests
        client.head = request.method == b"HEAD"
        if not request.http_version.startswith(b"1."):
            await client.send(plain(505, "http version not supported", close=True))
            return False
        declared = declared_length(request)
        if declared is not None and declared > self.limits.max_request_body:
            await client.send(plain(413, "request too large", close=True))
            return False
        conn = client.conn
        if conn.they_are_waiting_for_100_continue:
            continue_ = h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue")
            await client.stream.send_all(conn.send(continue_) or b"")
        received = 0
        while True:
            event = await client.next_event()
            if isinstance(event, h11.EndOfMessage):
                break
            if not isinstance(event, h11.Data):
                raise TypeError(f"h11 gave {type(event).__name__} inside a request body")
            received += len(event.data)
            if received > self.limits.max_request_body:
                await client.send(plain(413, "request too large", close=True))
                return False
        method = request.method.decode("ascii", "replace")
        target = request.target.decode("ascii", "replace")
        await client.send(answer(method, target, self.route))
        return conn.our_state is h11.DONE and conn.their_state is h11.DONE


def _phrase(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


async def serve_admin_listeners(
    listeners: Sequence[trio.abc.Listener[trio.SocketStream]],
    route: Router,
    *,
    limits: AdminLimits,
    events: EventLog,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve admin requests on listeners the caller opened; returns only when cancelled."""
    server = AdminServer(route, limits, events)
    # Connections run in this nursery, not the caller's; none lets an exception out.
    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(server.accept_loop, listener, nursery)
        task_status.started()


async def serve_admin(
    host: str,
    port: int,
    route: Router,
    *,
    limits: AdminLimits | None = None,
    events: EventLog | None = None,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Open a listener on `host`:`port` and serve it until cancelled."""
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        raise MeshIdError(
            f"cannot listen on {where}: {exc.strerror}", reason="listen_failed"
        ) from None
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(
                partial(
                    serve_admin_listeners,
                    listeners,
                    route,
                    limits=limits or AdminLimits(),
                    events=events or EventLog(),
                )
            )
            task_status.started(listeners)
    finally:
        for listener in listeners:
            await trio.aclose_forcefully(listener)
