"""Raw socket I/O: binding, accepting, connecting and the few plain writes the sidecar makes.

The trio shell's lowest layer, with no TLS and no policy: non-blocking stdlib
sockets waited on with `trio.lowlevel`, so that a connection costs one task
and no wrapper objects. Addresses are formatted here the way every log line
shows them (`host:port`, `[v6]:port`).
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import math
import select
import socket

import trio

from meshid.errors import MeshIdError
from meshid.reasons import Reason
from sidecar.config import Address

SO_MARK = getattr(socket, "SO_MARK", 36)  # linux/socket.h
ACCEPT_BACKOFF = 0.1  # seconds to wait after accept() failed in a way we did not foresee
# accept(2) on Linux: errors of the connection being accepted, to be retried like EAGAIN
ACCEPT_TRANSIENT = frozenset(
    {
        errno.ECONNABORTED,
        errno.EPROTO,
        errno.EPERM,
        errno.ENETDOWN,
        errno.ENOPROTOOPT,
        errno.EHOSTDOWN,
        errno.EHOSTUNREACH,
        errno.EOPNOTSUPP,
        errno.ENETUNREACH,
        errno.ENONET,
    }
)
ACCEPT_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def host_of(peer_addr: str) -> str:
    host = peer_addr.rsplit(":", 1)[0]
    return host[1:-1] if host.startswith("[") else host


def fmt_addr(addr: tuple[str, int] | tuple[str, int, int, int]) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@functools.lru_cache(maxsize=256)  # hosts come from the config: a handful, asked per connection
def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def bind(addr: Address) -> socket.socket:
    family = socket.AF_INET6 if ":" in addr.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((addr.host, addr.port))
        sock.listen(4096)
    except OSError as exc:
        sock.close()
        raise MeshIdError(
            f"cannot listen on {addr}: {exc.strerror}", reason=Reason.LISTEN_FAILED
        ) from None
    sock.setblocking(False)
    return sock


def accept(lsock: socket.socket) -> tuple[socket.socket, tuple[str, int]]:
    """One accepted connection, non-blocking, with Nagle off. BlockingIOError: none waiting."""
    sock, peer = lsock.accept()
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:  # some kernels refuse options on a connection reset before we saw it
        sock.close()
        raise OSError(errno.ECONNABORTED, "connection aborted before it was set up") from None
    except BaseException:
        sock.close()
        raise
    return sock, peer


async def linger(sock: socket.socket, seconds: float = 1.0, limit: int = 65536) -> None:
    """Let the alert we just sent reach the peer before the socket closes.

    Closing a socket with unread bytes (the client's Finished, its first
    request) makes the kernel send a reset, which can overtake the alert: the
    refused client would see "connection reset" instead of why. So: FIN after
    the alert, then read and discard what is in flight, briefly and boundedly.
    """
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        return
    seen = 0
    with trio.move_on_after(seconds):
        while seen < limit:
            try:
                data = sock.recv(16384)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)
                continue
            except OSError:
                return
            if not data:
                return
            seen += len(data)


def _settled(sock: socket.socket) -> bool:
    """Whether a connect in progress has already ended (connected or failed), without waiting.

    On loopback, and between network namespaces of one host, the kernel runs
    the whole TCP handshake inside connect(): the "in progress" it answers is
    over by the time it returns. One poll(0) says so; a trio wait (register
    the socket, sleep, wake, switch tasks) would cost several times as much,
    on every connection to the local app and to a local upstream.
    """
    poller = select.poll()
    poller.register(sock, select.POLLOUT)
    return bool(poller.poll(0))


async def connect_one(
    family: socket.AddressFamily,
    sockaddr: tuple[str, int],
    mark: int | None = None,
    deadline: float = math.inf,
) -> socket.socket:
    """One TCP connection, by `deadline` (trio's clock). Raises OSError (ETIMEDOUT past it).

    `mark`: SO_MARK set before the SYN, so that the capture rules skip the
    sidecar's own. The timeout's cancel scope is entered only when the connect
    is still in progress: a connect the kernel settled at once costs none.
    """
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    timed_out = False
    try:
        if mark is not None:
            sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
        err = sock.connect_ex(sockaddr)
        if err == errno.EINPROGRESS:
            if not _settled(sock):
                with trio.move_on_at(deadline) as timer:
                    await trio.lowlevel.wait_writable(sock)
                timed_out = timer.cancelled_caught
            err = (
                errno.ETIMEDOUT
                if timed_out
                else sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            )
    except BaseException:
        sock.close()
        raise
    if err:
        sock.close()
        raise OSError(
            err, "connect timed out" if timed_out else errno.errorcode.get(err, "connect failed")
        )
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


async def send_plain(sock: socket.socket, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view) :]
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)


async def connect(addr: Address, within: float, mark: int | None = None) -> socket.socket:
    """A non-blocking TCP connection to `addr`, within `within` seconds. Raises OSError."""
    deadline = trio.current_time() + within
    if is_ip(addr.host):
        family = socket.AF_INET6 if ":" in addr.host else socket.AF_INET
        return await connect_one(family, (addr.host, addr.port), mark, deadline)
    infos = await trio.socket.getaddrinfo(addr.host, addr.port, type=socket.SOCK_STREAM)
    last: OSError = OSError(errno.EHOSTUNREACH, "no address")
    for info in infos:
        if trio.current_time() >= deadline:
            raise OSError(errno.ETIMEDOUT, "connect timed out")
        try:
            return await connect_one(info[0], info[4][:2], mark, deadline)  # type: ignore[arg-type]
        except OSError as exc:
            last = exc
    raise last
