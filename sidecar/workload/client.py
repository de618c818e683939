"""A small Workload API client on trio and h2, for `meshid workload …`.

One connection per call: the commands make one call each (`watch` keeps
its one stream open). Statuses other than OK become `WorkloadApiError`
with the server's `grpc-message`, so the command prints one line.
"""

from __future__ import annotations

import socket
import struct
import urllib.parse
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager

import h2.config
import h2.connection
import h2.events
import trio

from meshid.errors import MeshIdError
from meshid.reasons import Reason

STATUS_NAMES = {
    1: "CANCELLED",
    2: "UNKNOWN",
    3: "INVALID_ARGUMENT",
    4: "DEADLINE_EXCEEDED",
    5: "NOT_FOUND",
    7: "PERMISSION_DENIED",
    8: "RESOURCE_EXHAUSTED",
    12: "UNIMPLEMENTED",
    13: "INTERNAL",
    14: "UNAVAILABLE",
}
MAX_MESSAGE = 4 * 1024 * 1024


class WorkloadApiError(MeshIdError):
    reason = Reason.WORKLOAD_API_CALL_FAILED

    def __init__(self, message: str, *, status: int = 2, reason: str | None = None) -> None:
        super().__init__(message, reason=reason)
        self.status = status


def socket_path(endpoint: str) -> str:
    """`unix:///run/x.sock`, `unix:/run/x.sock` or a plain path (SPIFFE_ENDPOINT_SOCKET forms)."""
    if endpoint.startswith("unix:"):
        parsed = urllib.parse.urlparse(endpoint)
        if parsed.netloc or not parsed.path:
            raise WorkloadApiError(
                f"socket {endpoint!r}: expected unix:///absolute/path",
                reason=Reason.INVALID_INPUT,
            )
        return parsed.path
    if "://" in endpoint:
        raise WorkloadApiError(
            f"socket {endpoint!r}: only unix sockets are supported", reason=Reason.INVALID_INPUT
        )
    return endpoint


@asynccontextmanager
async def call(
    endpoint: str, method: str, request: bytes = b""
) -> AsyncIterator[AsyncIterator[bytes]]:
    """Open one call; iterate the response messages; leaving the block ends the call."""
    path = socket_path(endpoint)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.connect(path)
    except OSError as exc:
        sock.close()
        raise WorkloadApiError(
            f"cannot connect to {path}: {exc.strerror}",
            status=14,
            reason=Reason.WORKLOAD_API_CALL_FAILED,
        ) from None
    stream = trio.SocketStream(sock)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    sid = conn.get_next_available_stream_id()
    conn.send_headers(
        sid,
        [
            (":method", "POST"),
            (":scheme", "http"),
            (":authority", "localhost"),
            (":path", f"/SpiffeWorkloadAPI/{method}"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            ("workload.spiffe.io", "true"),
        ],
    )
    conn.send_data(sid, struct.pack(">BI", 0, len(request)) + request, end_stream=True)

    async def messages() -> AsyncGenerator[bytes, None]:
        buffer = bytearray()
        trailers: dict[bytes, bytes] = {}
        await stream.send_all(conn.data_to_send())
        while True:
            data = await stream.receive_some(65536)
            if not data:
                raise WorkloadApiError("the server closed the connection", status=14)
            out: list[bytes] = []
            ended = False
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.DataReceived) and event.stream_id == sid:
                    conn.acknowledge_received_data(event.flow_controlled_length, sid)
                    buffer += event.data or b""
                    while len(buffer) >= 5:
                        size = struct.unpack_from(">I", buffer, 1)[0]
                        if size > MAX_MESSAGE:
                            raise WorkloadApiError("response message too large")
                        if len(buffer) < 5 + size:
                            break
                        out.append(bytes(buffer[5 : 5 + size]))
                        del buffer[: 5 + size]
                elif isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
                    trailers.update({bytes(k): bytes(v) for k, v in event.headers or ()})
                elif isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                    ended = True
                elif isinstance(event, h2.events.ConnectionTerminated):
                    raise WorkloadApiError("the server ended the connection", status=14)
            pending = conn.data_to_send()
            if pending:
                await stream.send_all(pending)
            for message in out:
                yield message
            if ended:
                status = int(trailers.get(b"grpc-status", b"2") or b"2")
                if status != 0:
                    text = urllib.parse.unquote(trailers.get(b"grpc-message", b"").decode())
                    name = STATUS_NAMES.get(status, str(status))
                    raise WorkloadApiError(f"{name}: {text}", status=status)
                return

    responses = messages()
    try:
        yield responses
    finally:
        with trio.move_on_after(1) as cleanup:
            cleanup.shield = True
            await responses.aclose()
            await stream.aclose()


async def unary(endpoint: str, method: str, request: bytes = b"") -> bytes:
    async with call(endpoint, method, request) as messages:
        async for message in messages:
            return message
    raise WorkloadApiError("the server sent no response", status=2)
