"""One HTTP/2 connection of the gRPC server: its streams, writes, flow control and calls.

Theory of operation. `h2` is sans-IO and keeps the HTTP/2 rules; this is the
trio shell around one `H2Connection`:

- One task per connection reads, feeds `h2`, and dispatches events. Each
  complete request (HEADERS, its one message, END_STREAM) starts one task for
  its RPC; a RST_STREAM from the client cancels that task.
- Every write goes through one lock and is sent before the lock is released,
  so what `h2` buffers is at most one frame batch: a client that never reads
  stalls its own connection (bounded by flow control and by one pending
  message per stream), and a write that cannot finish within
  `Limits.write_timeout` drops the connection.
- A message larger than the window waits for WINDOW_UPDATE; streaming RPCs
  send the *current* state when they may, never a queue of old ones.
- Callers are admitted by the kernel's credentials for the socket
  (SO_PEERCRED), read once at accept. A caller that is not admitted still
  speaks HTTP/2 and gets `PERMISSION_DENIED` on every call, which a gRPC
  client can report, instead of a reset it could not explain.
- Errors are gRPC statuses in trailers (`grpc-status`, `grpc-message`,
  percent-encoded); before any message they are sent Trailers-Only.
- A malformed frame, or a client breaking HTTP/2, gets GOAWAY with the code
  `h2` names and the connection closes; nothing else is affected.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import trio

from meshid.reasons import Reason
from sidecar.workload.grpcwire import (
    DEADLINE_EXCEEDED,
    INTERNAL,
    INVALID_ARGUMENT,
    OK,
    PERMISSION_DENIED,
    PREFIX,
    RESOURCE_EXHAUSTED,
    UNIMPLEMENTED,
    Call,
    GrpcError,
    grpc_message,
    grpc_timeout,
)
from sidecar.workload.unixsocket import PeerCred

if TYPE_CHECKING:
    from sidecar.workload.grpc import GrpcServer


@dataclass(eq=False, slots=True)
class _Stream:
    stream_id: int
    headers: dict[str, str]
    body: bytearray = field(default_factory=bytearray)
    scope: trio.CancelScope | None = None
    headers_sent: bool = False
    started: float = 0.0


class Connection:
    """One caller's HTTP/2 connection; `run` serves it until either side ends it."""

    def __init__(self, server: GrpcServer, stream: trio.SocketStream, peer: PeerCred) -> None:
        self.server = server
        self.stream = stream
        self.peer = peer
        self.admitted = server.admit(peer)
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None)
        )
        self.lock = trio.Lock()
        self.streams: dict[int, _Stream] = {}
        self.window = trio.Event()
        self.closed = False
        self.scope = trio.CancelScope()  # cancelled to drop the whole connection

    # -- writing ----------------------------------------------------------------

    async def _flush_locked(self) -> None:
        data = self.h2.data_to_send()
        if data and not self.closed:
            with trio.move_on_after(self.server.limits.write_timeout) as scope:
                await self.stream.send_all(data)
            if scope.cancelled_caught:
                self.closed = True
                self.scope.cancel()
                self.server.events.emit(
                    "workload_api_drop", uid=self.peer.uid, reason=Reason.WORKLOAD_API_SLOW_READER
                )
                raise trio.BrokenResourceError("caller does not read")

    async def flush(self) -> None:
        async with self.lock:
            await self._flush_locked()

    def _window_moved(self) -> None:
        self.window.set()
        self.window = trio.Event()

    async def send_message(self, st: _Stream, message: bytes) -> None:
        data = PREFIX.pack(0, len(message)) + message
        async with self.lock:
            if not st.headers_sent:
                self.h2.send_headers(
                    st.stream_id, [(b":status", b"200"), (b"content-type", b"application/grpc")]
                )
                st.headers_sent = True
                await self._flush_locked()  # the caller learns the call is accepted, window or not
        view = memoryview(data)
        while view:
            async with self.lock:
                window = min(
                    self.h2.local_flow_control_window(st.stream_id), self.h2.max_outbound_frame_size
                )
                if window > 0:
                    chunk, view = view[:window], view[window:]
                    self.h2.send_data(st.stream_id, chunk.tobytes())
                    await self._flush_locked()
                    continue
                waiter = self.window
            await waiter.wait()

    async def finish(self, st: _Stream, status: int, message: str = "") -> None:
        trailers = [(b"grpc-status", str(status).encode())]
        if message:
            trailers.append((b"grpc-message", grpc_message(message)))
        async with self.lock:
            if not st.headers_sent:  # Trailers-Only
                trailers = [
                    (b":status", b"200"),
                    (b"content-type", b"application/grpc"),
                    *trailers,
                ]
                st.headers_sent = True
            self.h2.send_headers(st.stream_id, trailers, end_stream=True)
            await self._flush_locked()

    # -- reading ----------------------------------------------------------------

    async def run(self) -> None:
        limits = self.server.limits
        self.h2.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: limits.max_streams_per_connection,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: limits.max_header_list_bytes,
            },
        )
        self.h2.initiate_connection()
        try:
            with self.scope:
                await self.flush()
                await self._serve()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def _serve(self) -> None:
        """The read loop and the call tasks; the first to see the caller gone ends them all."""
        async with trio.open_nursery() as nursery:
            try:
                await self._guarded(self._read_loop, nursery)
            finally:
                self.closed = True
                nursery.cancel_scope.cancel()

    async def _guarded(self, fn: Callable[..., Awaitable[None]], *args: object) -> None:
        try:
            await fn(*args)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            self.scope.cancel()

    def _deadline(self, opened: float, spoke: bool) -> float:
        """When to stop waiting: for the first bytes, or for the oldest unfinished request.

        No task per connection watches the clock: an idle connection with all
        its calls running costs no wakeups at all.
        """
        timeout = self.server.limits.request_timeout
        if not spoke:
            return opened + timeout
        waiting = [st.started for st in self.streams.values() if st.scope is None]
        return min(waiting) + timeout if waiting else math.inf

    async def _read_loop(self, nursery: trio.Nursery) -> None:
        opened, spoke = trio.current_time(), False
        while True:
            data = None
            with trio.move_on_at(self._deadline(opened, spoke)):
                data = await self.stream.receive_some(65536)
            if data is None:
                if not spoke:
                    return  # a caller that connects and never speaks is dropped
                self._expire_requests()
                await self.flush()
                continue
            spoke = True
            if not data:
                return
            try:
                events = self.h2.receive_data(data)
            except h2.exceptions.ProtocolError as exc:
                code = getattr(exc, "error_code", h2.errors.ErrorCodes.PROTOCOL_ERROR)
                self.server.events.emit(
                    "workload_api_drop",
                    uid=self.peer.uid,
                    reason=Reason.WORKLOAD_API_PROTOCOL_ERROR,
                )
                with contextlib.suppress(h2.exceptions.ProtocolError):
                    self.h2.close_connection(error_code=code)
                await self.flush()
                return
            for event in events:
                if not self._on_event(event, nursery):
                    await self.flush()
                    return
            await self.flush()

    def _on_event(self, event: h2.events.Event, nursery: trio.Nursery) -> bool:
        if isinstance(event, h2.events.RequestReceived):
            assert event.stream_id is not None
            headers = {
                bytes(k).decode("latin-1"): bytes(v).decode("latin-1")
                for k, v in event.headers or ()
            }
            self.streams[event.stream_id] = _Stream(
                event.stream_id, headers, started=trio.current_time()
            )
            if event.stream_ended is not None:
                self._dispatch(event.stream_id, nursery)
        elif isinstance(event, h2.events.DataReceived):
            assert event.stream_id is not None
            if event.flow_controlled_length:
                with contextlib.suppress(h2.exceptions.ProtocolError):
                    self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            st = self.streams.get(event.stream_id)
            if st is not None and st.scope is None:
                st.body += event.data or b""
                if len(st.body) > self.server.limits.max_request_bytes + PREFIX.size:
                    st.body.clear()
                    self._refuse(
                        st,
                        nursery,
                        GrpcError(
                            RESOURCE_EXHAUSTED,
                            "request too large",
                            reason=Reason.WORKLOAD_API_REQUEST_TOO_LARGE,
                        ),
                    )
            if event.stream_ended is not None:
                self._dispatch(event.stream_id, nursery)
        elif isinstance(event, h2.events.StreamEnded):
            assert event.stream_id is not None
            self._dispatch(event.stream_id, nursery)
        elif isinstance(event, h2.events.StreamReset):
            assert event.stream_id is not None
            gone = self.streams.pop(event.stream_id, None)
            if gone is not None and gone.scope is not None:
                gone.scope.cancel()
        elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            self._window_moved()
        elif isinstance(event, h2.events.ConnectionTerminated):
            return False
        return True

    def _dispatch(self, stream_id: int, nursery: trio.Nursery) -> None:
        st = self.streams.get(stream_id)
        if st is None or st.scope is not None:
            return
        st.scope = trio.CancelScope()
        nursery.start_soon(self._run_call, st)

    def _refuse(self, st: _Stream, nursery: trio.Nursery, error: GrpcError) -> None:
        if st.scope is not None:
            return
        st.scope = trio.CancelScope()
        nursery.start_soon(self._end_with, st, error)

    async def _end_with(self, st: _Stream, error: GrpcError) -> None:
        try:
            self.server.count(st.headers.get(":path", ""), error.reason)
            await self.finish(st, error.status, error.message)
        except (h2.exceptions.ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.streams.pop(st.stream_id, None)

    def _expire_requests(self) -> None:
        """A stream whose request never completes is reset, so it holds nothing for long."""
        limit = trio.current_time() - self.server.limits.request_timeout
        for st in list(self.streams.values()):
            if st.scope is None and st.started <= limit:
                self.streams.pop(st.stream_id, None)
                with contextlib.suppress(h2.exceptions.ProtocolError):
                    self.h2.reset_stream(st.stream_id, h2.errors.ErrorCodes.CANCEL)

    def _call_of(self, st: _Stream) -> Call:
        """The request, checked in the order a client can act on; GrpcError if refused."""
        h = st.headers
        path = h.get(":path", "")
        if h.get(":method") != "POST" or not h.get("content-type", "").startswith(
            "application/grpc"
        ):
            raise GrpcError(
                UNIMPLEMENTED, "not a gRPC request", reason=Reason.WORKLOAD_API_BAD_REQUEST
            )
        if not self.admitted:
            raise GrpcError(
                PERMISSION_DENIED,
                f"uid {self.peer.uid} gid {self.peer.gid} is not admitted to this socket",
                reason=Reason.WORKLOAD_API_CALLER_NOT_ADMITTED,
            )
        if path not in self.server.handlers:
            raise GrpcError(
                UNIMPLEMENTED, f"unknown method {path}", reason=Reason.WORKLOAD_API_BAD_REQUEST
            )
        body = bytes(st.body)
        if len(body) < PREFIX.size:
            raise GrpcError(
                INVALID_ARGUMENT, "request holds no message", reason=Reason.WORKLOAD_API_BAD_REQUEST
            )
        compressed, size = PREFIX.unpack_from(body)
        if compressed:
            raise GrpcError(
                UNIMPLEMENTED,
                "compressed requests are not supported",
                reason=Reason.WORKLOAD_API_BAD_REQUEST,
            )
        if size != len(body) - PREFIX.size:
            raise GrpcError(
                INVALID_ARGUMENT,
                "request must hold exactly one message",
                reason=Reason.WORKLOAD_API_BAD_REQUEST,
            )
        call = Call(path, h, body[PREFIX.size :], self.peer)
        self.server.check(call)
        return call

    async def _run_call(self, st: _Stream) -> None:
        assert st.scope is not None
        path = st.headers.get(":path", "")
        status, message, reason = OK, "", "ok"
        try:
            with st.scope:
                deadline = grpc_timeout(st.headers.get("grpc-timeout", ""))
                if deadline is not None:
                    st.scope.deadline = trio.current_time() + deadline
                try:
                    call = self._call_of(st)
                    handler = self.server.handlers[path]
                    await handler(call, _Reply(self, st))
                except GrpcError as exc:
                    status, message, reason = exc.status, exc.message, exc.reason
                except (
                    h2.exceptions.ProtocolError,
                    trio.BrokenResourceError,
                    trio.ClosedResourceError,
                ):
                    return  # the caller went away mid-call
                except Exception as exc:  # one call fails, not the connection
                    status, message, reason = INTERNAL, "internal error", Reason.INTERNAL_ERROR
                    self.server.events.emit(
                        "workload_api_error", method=path, reason=reason, error=type(exc).__name__
                    )
            if st.scope.cancelled_caught:
                if st.stream_id not in self.streams:
                    return  # reset by the caller
                status, message, reason = (
                    DEADLINE_EXCEEDED,
                    "deadline exceeded",
                    Reason.WORKLOAD_API_DEADLINE,
                )
            self.server.count(path, reason)
            with contextlib.suppress(
                h2.exceptions.ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError
            ):
                await self.finish(st, status, message)
        finally:
            self.streams.pop(st.stream_id, None)


@dataclass(eq=False, slots=True)
class _Reply:
    conn: Connection
    st: _Stream

    async def send(self, message: bytes) -> None:
        await self.conn.send_message(self.st, message)
