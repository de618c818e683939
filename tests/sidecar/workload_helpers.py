"""Clients for the Workload API tests: py-spiffe, raw grpcio, short socket paths."""

from __future__ import annotations

import os
import socket
import struct
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import h2.connection
import h2.events
import h2.settings
import trio

SERVICE = "/SpiffeWorkloadAPI/"


@contextmanager
def short_dir() -> Iterator[Path]:
    """A fresh 0700 directory with a short path: a Unix socket path holds at most 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="wl", dir="/tmp"))
    try:
        yield path
    finally:
        for child in path.iterdir():
            child.unlink()
        os.rmdir(path)


def raw_call(
    socket: Path,
    method: str,
    request: bytes = b"",
    *,
    metadata: tuple[tuple[str, str], ...] = (("workload.spiffe.io", "true"),),
    stream: bool = False,
    timeout: float = 5.0,
) -> list[bytes]:
    """One call with plain grpcio (blocking; run it in a thread); grpc.RpcError on failure."""
    with grpc.insecure_channel(f"unix:{socket}") as channel:
        if stream:
            call = channel.unary_stream(
                SERVICE + method,
                request_serializer=lambda b: b,
                response_deserializer=lambda b: b,
            )(request, metadata=metadata, timeout=timeout)
            try:
                return [next(call)]
            finally:
                call.cancel()
        reply = channel.unary_unary(
            SERVICE + method,
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )(request, metadata=metadata, timeout=timeout)
        return [reply]


# -- a raw HTTP/2 client on trio, for the edge cases no real client produces --------

GRPC_HEADERS = [(":method", "POST"), (":scheme", "http"), (":authority", "localhost")]


@dataclass
class RawStream:
    messages: list[bytes] = field(default_factory=list)
    buffer: bytearray = field(default_factory=bytearray)
    headers: dict[bytes, bytes] = field(default_factory=dict)
    ended: bool = False
    reset: bool = False


class H2Client:
    """A gRPC client from h2 frames: it does exactly what a test tells it, nothing more."""

    def __init__(self, stream: trio.SocketStream, settings: dict[int, int] | None = None) -> None:
        self.stream = stream
        self.h2 = h2.connection.H2Connection()
        if settings:
            self.h2.local_settings = h2.settings.Settings(client=True, initial_values=settings)
        self.h2.initiate_connection()
        self.streams: dict[int, RawStream] = {}
        self.terminated: h2.events.ConnectionTerminated | None = None
        self.closed = False

    @classmethod
    async def connect(cls, path: Path, settings: dict[int, int] | None = None) -> H2Client:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.connect(str(path))
        client = cls(trio.SocketStream(sock), settings)
        try:
            await client.flush()
        except BaseException:
            sock.close()
            raise
        return client

    async def flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            await self.stream.send_all(data)

    async def call(
        self,
        method: str,
        message: bytes | None = b"",
        *,
        metadata: tuple[tuple[str, str], ...] = (("workload.spiffe.io", "true"),),
    ) -> int:
        """Open a stream; with message None, send the headers only and leave it open."""
        sid = self.h2.get_next_available_stream_id()
        headers = [
            *GRPC_HEADERS,
            (":path", SERVICE + method),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            *metadata,
        ]
        self.h2.send_headers(sid, headers, end_stream=False)
        if message is not None:
            self.h2.send_data(sid, struct.pack(">BI", 0, len(message)) + message, end_stream=True)
        self.streams[sid] = RawStream()
        await self.flush()
        return sid

    async def pump(self) -> None:
        """Read once and apply what arrived."""
        data = await self.stream.receive_some(65536)
        if not data:
            self.closed = True
            return
        for event in self.h2.receive_data(data):
            sid = getattr(event, "stream_id", None)
            st = self.streams.get(sid) if sid else None
            if isinstance(event, h2.events.DataReceived) and st is not None:
                self.h2.acknowledge_received_data(event.flow_controlled_length, sid)
                st.buffer += event.data
                while len(st.buffer) >= 5:
                    size = struct.unpack_from(">I", st.buffer, 1)[0]
                    if len(st.buffer) < 5 + size:
                        break
                    st.messages.append(bytes(st.buffer[5 : 5 + size]))
                    del st.buffer[: 5 + size]
            elif isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
                if st is not None:
                    st.headers.update(dict(event.headers))  # type: ignore[arg-type]
            elif isinstance(event, h2.events.StreamEnded) and st is not None:
                st.ended = True
            elif isinstance(event, h2.events.StreamReset) and st is not None:
                st.reset = True
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.terminated = event
        await self.flush()

    async def wait(self, done: Callable[[], bool]) -> None:
        while not done():
            if self.closed:
                raise AssertionError("connection closed while waiting")
            await self.pump()

    async def aclose(self) -> None:
        await self.stream.aclose()
