"""A small gRPC server: HTTP/2 (the `h2` state machine) on a Unix socket, under trio.

Theory of operation. `h2` is sans-IO: it turns bytes into events and our
calls into bytes, and it keeps the HTTP/2 rules (framing, HPACK, stream
states, flow-control windows, PING and SETTINGS acknowledgements). The server
is the shell around it, in three parts:

- `unixsocket`: the socket file's hygiene and the caller's credentials
  (SO_PEERCRED), read once at accept.
- `h2conn`: one HTTP/2 connection, its streams, its writes and flow control,
  and the dispatch of each complete request to its handler.
- `grpcwire`: the part of gRPC that rides on top (statuses, message framing,
  trailers, grpc-timeout), with no I/O.

This module owns the listener: it accepts up to `Limits.max_connections`
callers, runs one connection task for each, and removes the socket file when
it stops.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import trio

from meshid.events import EventLog
from meshid.reasons import Reason
from sidecar.workload.grpcwire import Admit, Check, Handler
from sidecar.workload.h2conn import Connection
from sidecar.workload.unixsocket import bind_unix, peer_credentials, remove_if_ours


@dataclass(frozen=True, slots=True)
class Limits:
    """What one server spends at most; the README's limits table names these numbers."""

    max_connections: int = 1024
    max_streams_per_connection: int = 100
    max_request_bytes: int = 64 * 1024  # a Workload API request is a few hundred bytes
    max_header_list_bytes: int = 16 * 1024
    request_timeout: float = 10.0  # HEADERS to END_STREAM, and the HTTP/2 preface
    write_timeout: float = 30.0  # one blocked write to a caller that does not read


class GrpcServer:
    """Serves `handlers` (by `/Service/Method` path) on one Unix socket."""

    def __init__(
        self,
        handlers: Mapping[str, Handler],
        *,
        admit: Admit,
        check: Check = lambda call: None,
        limits: Limits | None = None,
        events: EventLog | None = None,
        count: Callable[[str, str], None] = lambda method, reason: None,
    ) -> None:
        self.handlers = dict(handlers)
        self.admit = admit
        self.check = check
        self.limits = limits or Limits()
        self.events = events if events is not None else EventLog()
        self.count = count
        self.connections = 0

    async def serve(
        self, path: Path, *, task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Bind `path` (0660, replacing a stale socket), serve until cancelled, then remove it."""
        sock, inode = bind_unix(path)
        await self.serve_bound(sock, path, inode, task_status=task_status)

    async def serve_bound(
        self,
        sock: trio.socket.SocketType,
        path: Path,
        inode: int,
        *,
        task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve a socket `bind_unix` made; close it and remove its file when cancelled."""
        try:
            listener = trio.SocketListener(sock)
            task_status.started(path)
            async with trio.open_nursery() as nursery:
                while True:
                    conn = await listener.accept()
                    if self.connections >= self.limits.max_connections:
                        self.events.emit(
                            "workload_api_drop", reason=Reason.WORKLOAD_API_TOO_MANY_CONNECTIONS
                        )
                        await conn.aclose()
                        continue
                    nursery.start_soon(self._handle, conn)
        finally:
            sock.close()
            remove_if_ours(path, inode)

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        try:
            peer = peer_credentials(stream.socket)
            await Connection(self, stream, peer).run()
        except OSError:
            pass
        finally:
            self.connections -= 1
            with contextlib.suppress(Exception):
                await stream.aclose()
