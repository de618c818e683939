"""One established connection's two directions of bytes: the state machine the pump drives.

Theory of operation. A `Flow` moves bytes between a plain socket and a TLS
connection with non-blocking calls only; it never waits. The `Pump`
(`sidecar.pump`) calls it when epoll says one of its sockets is ready, and
asks it which readiness each socket needs next (`masks`).

Each direction reads one chunk, writes all of it, and only then reads again,
so a slow reader stops us reading from the other side (backpressure through
the kernel's buffers) and a connection holds at most one buffer per
direction, only while bytes are in flight: an idle connection holds none.
After one chunk a direction returns to the pump; if more is waiting, epoll
says so again (level-triggered), so one busy stream cannot starve the rest.

OpenSSL keeps nothing from epoll here: read-ahead is off and every read has
room for a whole record, so after a read the rest of the stream is in the
kernel, where epoll sees it.

End of stream travels across: a plain EOF becomes close_notify + FIN on the
TLS side, a close_notify becomes a FIN on the plain side, and the other
direction keeps flowing until it ends too (half-close). Anything abnormal
(reset, truncation, a TLS error) ends the whole connection; the plain side
is then reset rather than closed, so the app can tell the stream was cut.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
from typing import TYPE_CHECKING

import outcome
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

if TYPE_CHECKING:
    from sidecar.pump import Pump

CHUNK = 64 * 1024
IN = select.EPOLLIN
OUT = select.EPOLLOUT
ERR = select.EPOLLERR | select.EPOLLHUP

BURST = 4  # chunks a direction moves per readiness event before others get a turn
OPEN, EOF, DONE = 0, 1, 2  # a direction: flowing; end seen, not yet passed on; ended


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


class Flow:
    """One established connection's two directions, driven by readiness events.

    `up` is plain → TLS (the local app's bytes, `bytes_out`), `down` is TLS →
    plain (`bytes_in`). A direction's pending bytes are the unsent tail of the
    chunk it last read; `*_wants` is what OpenSSL needs from the TLS socket
    before that direction can go on.
    """

    __slots__ = (
        "down",
        "down_buf",
        "down_state",
        "down_wants",
        "entry",
        "pfd",
        "plain",
        "pmask",
        "pump",
        "result",
        "task",
        "tfd",
        "tls",
        "tmask",
        "up",
        "up_buf",
        "up_state",
        "up_wants",
    )

    def __init__(self, pump: Pump, plain: socket.socket, tls: TlsStream, entry: LiveConnection):
        self.pump = pump
        self.plain = plain
        self.tls = tls
        self.entry = entry
        self.pfd = plain.fileno()
        self.tfd = tls.fd
        self.up: memoryview | None = None
        self.up_buf: bytearray | None = None
        self.up_state = OPEN
        self.up_wants = 0
        self.down: memoryview | None = None
        self.down_buf: bytearray | None = None
        self.down_state = OPEN
        self.down_wants = IN
        self.pmask = 0
        self.tmask = 0
        self.task: trio.lowlevel.Task | None = None
        self.result: outcome.Outcome[None] | None = None

    # -- plain → TLS -----------------------------------------------------------

    def step_up(self) -> None:
        if self.up is not None and not self._send_tls():
            return
        pool = self.pump.pool
        if self.up_state == EOF:
            self._close_tls_write()
            return
        for _ in range(BURST):
            if self.up_state != OPEN:
                return
            buf = pool.get()
            view = memoryview(buf)
            try:
                n = self.plain.recv_into(view)
            except BlockingIOError:
                pool.put(buf)
                return
            except OSError:
                pool.put(buf)
                raise StreamAborted("local_reset") from None
            if n == 0:
                pool.put(buf)
                self.up_state = EOF
                self._close_tls_write()
                return
            entry = self.entry
            entry.bytes_out += n
            entry.last_activity = self.pump.now
            self.up_buf = buf
            self.up = view[:n]
            if not self._send_tls() or n < CHUNK:
                return  # blocked, or the kernel had no more: epoll will say when

    def _send_tls(self) -> bool:
        data = self.up
        tls = self.tls
        while data:
            try:
                sent = tls.send_nowait(data)
            except SSL.WantWriteError:
                self.up, self.up_wants = data, OUT
                return False
            except SSL.WantReadError:
                self.up, self.up_wants = data, IN
                return False
            except SSL.SysCallError:
                raise StreamAborted("peer_reset") from None
            except SSL.Error as exc:
                raise StreamAborted(stream_failure_reason(exc)) from None
            data = data[sent:]
        self.up = None
        self.up_wants = 0
        if self.up_buf is not None:
            self.pump.pool.put(self.up_buf)
            self.up_buf = None
        return True

    def _close_tls_write(self) -> None:
        """close_notify (one SSL_shutdown, no read), then a TCP FIN; reading goes on."""
        try:
            self.tls.conn.shutdown()
        except SSL.WantWriteError:
            self.up_wants = OUT
            return
        except SSL.Error:
            pass  # WantRead: close_notify is out. Anything else: the read side will tell.
        self.tls.sent_close = True
        with contextlib.suppress(OSError):
            self.tls.sock.shutdown(socket.SHUT_WR)
        self.up_state = DONE
        self.up_wants = 0

    # -- TLS → plain -----------------------------------------------------------

    def step_down(self) -> None:
        if self.down is not None:
            if not self._send_plain():
                return
            if self.down_state == EOF:
                self._close_plain_write()
                return
        for _ in range(BURST):
            if self.down_state != OPEN or not self._read_tls():
                return

    def _read_tls(self) -> bool:
        """One buffer's worth of records to the plain side. True if more may be waiting."""
        pool = self.pump.pool
        buf = pool.get()
        view = memoryview(buf)
        filled = 0
        more = False
        self.down_wants = IN
        tls = self.tls
        try:
            # Whole records until OpenSSL would block or the buffer is full. A lone
            # short record is a message on its own (the sender paused): there was
            # room for a whole record, so OpenSSL holds nothing back (read-ahead is
            # off) and epoll sees whatever comes next; asking again would only cost
            # a failed read.
            while True:
                if filled > CHUNK - RECORD:
                    more = True
                    break
                try:
                    n = tls.recv_into_nowait(view[filled:])
                except SSL.WantWriteError:
                    self.down_wants = OUT
                    break
                if n > 0:
                    if n < RECORD and not filled:
                        filled = n
                        break
                    filled += n
                elif n == 0:
                    self.down_state = EOF
                    break
                else:
                    break
        except (TruncatedError, PeerResetError, SSL.Error) as exc:
            pool.put(buf)
            if isinstance(exc, TruncatedError):
                reason = "peer_truncated"
            elif isinstance(exc, PeerResetError):
                reason = "peer_reset"
            else:
                reason = stream_failure_reason(exc)
            raise StreamAborted(reason) from None
        if filled:
            entry = self.entry
            entry.bytes_in += filled
            entry.last_activity = self.pump.now
            self.down_buf = buf
            self.down = view[:filled]
            if not self._send_plain():
                return False
        else:
            pool.put(buf)
        if self.down_state == EOF:
            self._close_plain_write()
            return False
        return more

    def _send_plain(self) -> bool:
        data = self.down
        plain = self.plain
        while data:
            try:
                sent = plain.send(data)
            except BlockingIOError:
                self.down = data
                return False
            except OSError as exc:
                reason = "local_reset" if isinstance(exc, ConnectionError) else "io_error"
                raise StreamAborted(reason) from None
            data = data[sent:]
        self.down = None
        if self.down_buf is not None:
            self.pump.pool.put(self.down_buf)
            self.down_buf = None
        return True

    def _close_plain_write(self) -> None:
        with contextlib.suppress(OSError):
            self.plain.shutdown(socket.SHUT_WR)
        self.down_state = DONE

    # -- readiness -------------------------------------------------------------

    def masks(self) -> tuple[int, int]:
        plain = 0
        if self.up is None and self.up_state == OPEN:
            plain |= IN
        if self.down is not None:
            plain |= OUT
        tls = 0
        if self.up is not None or self.up_state == EOF:
            tls |= self.up_wants
        if self.down is None and self.down_state == OPEN:
            tls |= self.down_wants
        return plain, tls

    def on_event(self, fd: int, events: int) -> None:
        if fd == self.pfd:
            if events & (IN | ERR):
                self.step_up()
            if events & (OUT | ERR):
                self.step_down()
        else:
            waiting_down = self.down is None and self.down_state == OPEN
            if waiting_down and events & (self.down_wants | ERR):
                self.step_down()
            if self.up_wants and events & (self.up_wants | ERR):
                self.step_up()

    def release(self) -> None:
        pool = self.pump.pool
        if self.up_buf is not None:
            pool.put(self.up_buf)
        if self.down_buf is not None:
            pool.put(self.down_buf)
        self.up = self.down = self.up_buf = self.down_buf = None
