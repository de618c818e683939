"""HTTP/1.1 on one TLS stream: h11, request limits, HEAD, 405 and 501, replies and their log."""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import parse_qsl, urlsplit

import h11
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from ca.api import MAX_BODY, Reply, Request, error
from ca.dispatch import Dispatcher
from ca.plane import _failure_fields, _retry_later, _unavailable
from meshid.errors import MeshIdError
from meshid.spiffeid import SpiffeId
from meshid.svid import leaf_spiffe_id
from meshid.version import SERVER_HEADER
from meshid.wire import (
    ADMIN_POLICY,
    ADMIN_REVOKE,
    ADMIN_RUN,
    BUNDLE,
    ENROLL,
    HEALTH,
    JWT_SVID,
    RENEW,
    REPORT,
    WATCH,
)

# method -> paths: what HEAD, 405 and Allow are computed from (ca.api routes the rest)
ROUTES: dict[str, tuple[str, ...]] = {
    ENROLL: ("POST",),
    RENEW: ("POST",),
    REPORT: ("POST",),
    BUNDLE: ("GET", "HEAD"),
    WATCH: ("GET", "HEAD"),
    HEALTH: ("GET", "HEAD"),
    JWT_SVID: ("POST",),
    ADMIN_POLICY: ("POST",),
    ADMIN_REVOKE: ("POST",),
    ADMIN_RUN: ("POST",),
}
# the client's certificate, the ID it names and its SHA-256: read once per connection
_Peer = tuple[x509.Certificate | None, SpiffeId | None, bytes | None]
# RFC 9110's methods: known to this server, so a path that does not take one says 405
KNOWN_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)


class HttpShell(Dispatcher):
    __slots__ = ()

    async def _serve_http(
        self,
        stream: trio.SSLStream[trio.SocketStream],
        source: str,
        cert: x509.Certificate | None,
    ) -> None:
        try:
            await self._http(stream, source, cert)
        except (
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            trio.TooSlowError,  # it stopped reading what we send
            ssl.SSLError,
            OSError,
        ):
            pass  # the peer went away
        finally:
            await trio.aclose_forcefully(stream)

    async def _http(
        self, stream: trio.SSLStream[trio.SocketStream], source: str, cert: x509.Certificate | None
    ) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=16 * 1024)
        options = self.options
        # once: every watch of a kept connection asks who it is
        fingerprint = None if cert is None else cert.fingerprint(hashes.SHA256())
        peer: _Peer = (cert, _peer_id(cert), fingerprint)
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
                reply = await self._reply(cycle, cycle.request, body, source, peer)
            # HEAD is answered without a body even when the request failed half-way
            await self._send(stream, conn, reply, head=cycle.method == "HEAD")
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()

    async def _reply(
        self,
        cycle: _Cycle,
        request: h11.Request,
        body: bytes,
        source: str,
        peer: _Peer,
    ) -> Reply:
        method = request.method.decode("ascii", "replace")
        cert, peer_id, fingerprint = peer
        try:
            target = urlsplit(request.target.decode("ascii", "replace"))
        except ValueError:  # e.g. "//[": an IPv6 authority never closed
            return error(400, "bad_request", "request target cannot be parsed")
        query = dict(parse_qsl(target.query))
        if method == "HEAD":
            query.pop("stream", None)  # the head of one feed: nothing to stream
        req = Request(
            method="GET" if method == "HEAD" else method,
            path=target.path,
            query=query,
            body=body,
            source=source,
            peer_cert=cert,
            peer_id=peer_id,
            peer_fingerprint=fingerprint,
            received=cycle.started,
        )
        reply = _method_reply(method, req.path) or await self._answer(req)
        self.metrics.observe_reply(req.path, reply.status, reply.body.get("error"))
        refused = reply.status >= 400
        if refused or req.path in (ENROLL, RENEW):
            # one line per SVID issued, naming the instance that signed it (on a trust
            # domain of several), so an operator can see which one served a sidecar;
            # refusals at most 20 a second, and the authority's own failures (5xx) 20 more
            # (each is counted in the metrics regardless)
            left_out: int | None = 0
            if refused:
                lines = self._fault_lines if reply.status >= 500 else self._refusal_lines
                left_out = lines.allow(self.clock.monotonic())
            if left_out is None:
                return reply
            instance = self.authority.instance
            self.log(
                "request",
                method=method[:16],
                path=req.path[:256],
                source=source,
                status=reply.status,
                reason=reply.body.get("error"),
                spiffe_id=_who(reply, peer_id),
                serial=reply.body.get("serial"),
                **({"instance": instance} if instance else {}),
                **({"suppressed": left_out} if left_out else {}),
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
                # trio.fail_at, without its generator: once per request of every watch
                with trio.CancelScope(deadline=deadline) as scope:
                    data = await stream.receive_some(16384)
                if scope.cancelled_caught:
                    raise trio.TooSlowError
                conn.receive_data(bytes(data))
                if cycle.started is None and data:
                    cycle.started = self.clock.wall()
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
        if reply.stream is not None and not head:
            await self._send_stream(stream, conn, reply)
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
        await self._send_within(stream, data)

    async def _send_within(self, stream: trio.SSLStream[trio.SocketStream], data: bytes) -> None:
        """Send `data` within `request_timeout` (a peer that never reads), or TooSlowError.

        trio.fail_after without its generator: this runs for every line of every stream.
        """
        with trio.CancelScope(deadline=trio.current_time() + self.options.request_timeout) as scope:
            await stream.send_all(data)
        if scope.cancelled_caught:
            raise trio.TooSlowError

    async def _send_stream(
        self,
        stream: trio.SSLStream[trio.SocketStream],
        conn: h11.Connection,
        reply: Reply,
    ) -> None:
        """A streamed reply: the head, each line as `reply.stream` makes it, the end.

        Chunked, so the connection is kept for the next request once it ends;
        each write has `request_timeout` (a peer that stops reading is dropped),
        and nothing else but the server stopping ends it: not the stream's own
        deadline, which would cut a line half-way.
        The head waits for `reply.stream`'s first call (an empty line sends it
        alone): nothing is awaited between the dispatcher admitting the watch
        and the stream counting it as parked, so no other watch slips past the
        caps.
        """
        assert reply.stream is not None
        headers = [
            ("content-type", "application/x-ndjson"),
            ("server", SERVER_HEADER),
            *reply.headers,
        ]
        unsent = [conn.send(h11.Response(status_code=reply.status, headers=headers)) or b""]

        async def send(event: h11.Data | h11.EndOfMessage) -> None:
            data = conn.send(event) or b""  # an empty line: no chunk at all
            if unsent:
                data = unsent.pop() + data
            await self._send_within(stream, data)

        await reply.stream(lambda line: send(h11.Data(data=line)))
        await send(h11.EndOfMessage())


@dataclass(slots=True)
class _Cycle:
    """What is known of the request being read: enough to answer even a broken one right."""

    request: h11.Request | None = None
    started: datetime | None = None  # wall clock at the request's first byte

    @property
    def method(self) -> str | None:
        return None if self.request is None else self.request.method.decode("ascii", "replace")


class _BodyTooLarge(Exception):
    pass


def _who(reply: Reply, peer_id: SpiffeId | None) -> str | None:
    """The identity a request was about, for its log line: the one issued, or the caller's.

    Never the token: a failed enrollment names no one.
    """
    issued = reply.body.get("spiffe_id")
    if isinstance(issued, str):
        return issued
    return None if peer_id is None else str(peer_id)


def _peer_id(cert: x509.Certificate | None) -> SpiffeId | None:
    """The SPIFFE ID a client certificate names, unverified; None if it names none."""
    if cert is None:
        return None
    try:
        return leaf_spiffe_id(cert)
    except MeshIdError:
        return None


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


def _content_length(headers: Sequence[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
