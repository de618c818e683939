"""The copy loop: bytes both ways between a plain socket and a TLS stream.

Theory of operation. One task per direction. A direction reads a chunk,
writes all of it, and only then reads again, so a slow reader stops us
reading from the other side (backpressure through the kernel's buffers) and
a connection holds at most one buffer per direction, only while bytes are in
flight: an idle connection holds none. Buffers come from a shared pool.

End of stream travels across: a plain EOF becomes close_notify + FIN on the
TLS side, a close_notify becomes a FIN on the plain side, and the other
direction keeps flowing until it ends too (half-close). Anything abnormal
(reset, truncation, a TLS error) ends the whole connection; the plain side
is then reset rather than closed, so the app can tell the stream was cut.
"""

from __future__ import annotations

import contextlib
import socket
import struct

import trio
from OpenSSL import SSL

from sidecar.registry import LiveConnection
from sidecar.tlsio import (
    RECORD,
    PeerResetError,
    TlsStream,
    TruncatedError,
    stream_failure_reason,
)

CHUNK = 64 * 1024


class BufferPool:
    """Reusable 64 KiB buffers; idle connections hold none."""

    __slots__ = ("_free", "_limit")

    def __init__(self, limit: int = 256) -> None:
        self._free: list[bytearray] = []
        self._limit = limit

    def get(self) -> bytearray:
        return self._free.pop() if self._free else bytearray(CHUNK)

    def put(self, buf: bytearray) -> None:
        if len(self._free) < self._limit:
            self._free.append(buf)


class StreamAborted(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def reset(sock: socket.socket) -> None:
    """Close with RST: the peer learns the stream was cut, not finished."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def send_all_plain(sock: socket.socket, data: memoryview) -> None:
    while data:
        try:
            sent = sock.send(data)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)
            continue
        except OSError as exc:
            reason = "local_reset" if isinstance(exc, ConnectionError) else "io_error"
            raise StreamAborted(reason) from None
        data = data[sent:]


async def plain_to_tls(
    plain: socket.socket, tls: TlsStream, entry: LiveConnection, pool: BufferPool
) -> None:
    buf: bytearray | None = None
    try:
        while True:
            buf = pool.get()
            view = memoryview(buf)
            try:
                n = plain.recv_into(view)
            except BlockingIOError:
                # Nothing to read: wait without holding a buffer.
                pool.put(buf)
                buf = None
                await trio.lowlevel.wait_readable(plain)
                continue
            except OSError:
                raise StreamAborted("local_reset") from None
            if n == 0:
                await tls.shutdown_write()
                return
            try:
                await tls.send_all(view[:n])
            except PeerResetError:
                raise StreamAborted("peer_reset") from None
            except SSL.Error as exc:
                raise StreamAborted(stream_failure_reason(exc)) from None
            pool.put(buf)
            buf = None
            entry.last_activity = trio.current_time()
            entry.bytes_out += n
            await trio.lowlevel.checkpoint()
    finally:
        if buf is not None:
            pool.put(buf)


async def tls_to_plain(
    tls: TlsStream, plain: socket.socket, entry: LiveConnection, pool: BufferPool
) -> None:
    buf: bytearray | None = None
    try:
        while True:
            buf = pool.get()
            view = memoryview(buf)
            filled = 0
            eof = False
            # Drain whole records until OpenSSL would block or the buffer is full.
            while filled <= CHUNK - RECORD:
                try:
                    n = tls.recv_into_nowait(view[filled:])
                except SSL.WantWriteError:
                    if filled:
                        break
                    await tls.wait_writable()
                    continue
                except TruncatedError:
                    raise StreamAborted("peer_truncated") from None
                except PeerResetError:
                    raise StreamAborted("peer_reset") from None
                except SSL.Error as exc:
                    raise StreamAborted(stream_failure_reason(exc)) from None
                if n > 0:
                    filled += n
                elif n == 0:
                    eof = True
                    break
                elif filled:
                    break
                else:
                    # Nothing buffered: wait without holding a buffer.
                    pool.put(buf)
                    buf = None
                    await tls.wait_readable()
                    buf = pool.get()
                    view = memoryview(buf)
            if filled:
                await send_all_plain(plain, view[:filled])
                entry.last_activity = trio.current_time()
                entry.bytes_in += filled
            pool.put(buf)
            buf = None
            if eof:
                with contextlib.suppress(OSError):
                    plain.shutdown(socket.SHUT_WR)
                return
            await trio.lowlevel.checkpoint()
    finally:
        if buf is not None:
            pool.put(buf)


async def pump(
    plain: socket.socket, tls: TlsStream, entry: LiveConnection, pool: BufferPool
) -> None:
    """Copy both ways until both directions have ended. Raises StreamAborted on failure."""
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(plain_to_tls, plain, tls, entry, pool)
            nursery.start_soon(tls_to_plain, tls, plain, entry, pool)
    except BaseExceptionGroup as group:
        # The nursery wraps a direction's StreamAborted in a group (both directions
        # may fail at once); the caller handles a bare StreamAborted, and anything
        # that escapes the connection's task would take the whole sidecar down.
        aborted, rest = group.split(StreamAborted)
        if rest is not None:
            raise rest from None  # Cancelled (or a bug) must keep propagating
        assert aborted is not None
        first: BaseException = aborted
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from None
