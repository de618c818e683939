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
  408) and its body may not exceed 64 KiB (413); a reply must be taken
  within `request_timeout` too. Every method is answered: HEAD as GET
  without the body, a method the path does not take 405 with ``Allow``, a
  method this server does not know 501.
- Failure boundaries: each connection is one unit of work. Whatever its
  peer sends, and whatever the authority raises while answering it (a full
  disk, a bug), ends that request or that connection only: the request gets
  503 with ``Retry-After`` when the authority failed, the connection is
  closed and ``internal_error`` logged with the exception's type for
  anything else. The poller and the batcher log and carry on likewise.
- Admission: a connection that has not shown a client certificate is
  *anonymous*. Anonymous connections are capped per source address
  (`max_per_source`: more are closed at once) and in all (`max_connections`:
  the oldest makes room for the newest), and may idle only
  `anonymous_idle_timeout`. A connection whose handshake carried a
  certificate of this trust domain moves to a separate pool
  (`max_authenticated`), and long-poll watches have a budget of their own
  (`max_watches_per_identity`, `max_watches`; past it a watch is answered
  429 with ``Retry-After``): a flood of anonymous connections cannot take the
  places sidecars need.
- The authority is synchronous (SQLite). Calls go to one worker thread at a
  time, so a CLI command holding the database lock stalls requests, not the
  event loop.
- One poller reads the database's version counters a few times a second and
  wakes every long-polling watcher when one moves; changes made by other
  processes (`meshid policy deny`, `meshid ca revoke`) reach sidecars within
  that interval plus one round trip. On PostgreSQL every instance also
  LISTENs for the notice each change sends when it commits, and wakes its
  watchers at once (`ca.pgshared`); the poller is then the fallback.
- Once a second the poller also lets `ca.rootkeeper` look at the root: it
  publishes the next root at half the active one's life and lets it activate
  (gated on sidecars) well before expiry; `--no-auto-rotate` turns that off.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import trio
from cryptography import x509

from ca.httpshell import HttpShell
from ca.plane import SERVER_DIR, ServerOptions, _describe, _is_storage_failure
from meshid.errors import MeshIdError, StateError, StorageUnavailable
from meshid.reasons import Reason
from meshid.version import VERSION

T = TypeVar("T")

__all__ = ["ControlPlane", "ServerOptions", "bind_listener"]  # ServerOptions: ca.plane


class ControlPlane(HttpShell):
    """The control plane: its state (ca.plane) and behaviour (ca.dispatch, ca.httpshell), served."""

    __slots__ = ()

    # -- for the bundle endpoint (ca.bundle_endpoint) --

    def server_context(self) -> ssl.SSLContext:
        """The TLS context of the control plane's own SVID (no client certificate required)."""
        assert self._creds is not None, "serve() loads the credentials first"
        return self._creds.context

    async def db_call(self, fn: Callable[..., T], *args: Any) -> T:
        return await self._db_call(fn, *args)

    # -- connections --

    async def serve(
        self,
        sock: socket.socket | None = None,
        *,
        task_status: trio.TaskStatus[tuple[str, int]],
    ) -> None:
        """Serve on `sock` (bound and listening, perhaps shared with other workers)."""
        try:
            await self._wait_for_own_root()
            await self._refresh_credentials()
            self._versions = await self._db_call(self.authority.versions)
            await self._db_call(self.authority.heard)
            await self._db_call(self.metrics.refresh, self.authority)
            if self.options.ui is not None:
                await self._db_call(self.graph.refresh, self.authority)
        except Exception as exc:
            if isinstance(exc, MeshIdError) or not _is_storage_failure(exc):
                raise
            # a full or read-only disk: one line for the operator, not a traceback
            raise StorageUnavailable(
                f"cannot start: the authority's state cannot be written ({_describe(exc)})"
            ) from None
        _remove_stale_key_files(self.authority.state_dir / SERVER_DIR)
        if sock is None:
            sock = bind_listener(self.options.host, self.options.port)
        listeners = [trio.SocketListener(trio.socket.from_stdlib_socket(sock))]
        sockname = sock.getsockname()
        self.bound = (str(sockname[0]), int(sockname[1]))
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._poll)
                nursery.start_soon(self._batcher)
                nursery.start_soon(self._feed_reader)
                nursery.start_soon(self._watch_checker)
                if self.listener is not None:
                    nursery.start_soon(self._listen)
                self.log(
                    "serving",
                    listen=f"{self.bound[0]}:{self.bound[1]}",
                    trust_domain=self.authority.trust_domain.name,
                    spiffe_id=str(self.identity),
                    version=VERSION,
                )
                task_status.started(self.bound)
                # Connections run in a nursery of their own; each is its own failure boundary.
                async with trio.open_nursery() as handlers:
                    await trio.serve_listeners(
                        self._connection, listeners, handler_nursery=handlers
                    )
        finally:
            if self._own_limiter is not None:  # its database connection, if it made one
                self._own_limiter.close()

    async def _wait_for_own_root(self) -> None:
        """A joining instance serves once its root passed the rollover gate (ca.roots).

        Until then it would sign nothing, not even its own server certificate:
        it says so once and looks again every poll interval.
        """
        waiting = False
        while (pending := await self._db_call(self.authority.own_root_pending)) is not None:
            if not waiting:
                waiting = True
                self.log(
                    "waiting_for_root",
                    reason=Reason.ROOT_PENDING,
                    generation=pending.generation,
                    activate_at=pending.activate_at.isoformat(),
                )
            await trio.sleep(self.options.poll_interval)

    async def _connection(self, tcp: trio.SocketStream) -> None:
        """One connection, start to end; nothing it does can end the server."""
        source = "unknown"
        try:
            try:
                source = str(tcp.socket.getpeername()[0])
            except OSError:
                return  # the peer reset before we looked: nothing to serve
            await self._admitted(tcp, source)
        except Exception as exc:  # a bug or an unforeseen peer: this connection only
            self.log(
                "internal_error", reason="internal_error", source=source, error=type(exc).__name__
            )
        finally:
            await trio.aclose_forcefully(tcp)

    def _log_throttled(self, event: str, **fields: Any) -> None:
        """Log a line a flood could repeat without end: at most a few a second, and the
        next line says how many were left out."""
        suppressed = self._throttle.allow(self.clock.monotonic())
        if suppressed is not None:
            self.log(event, **fields, suppressed=suppressed or None)

    def _shed(self, source: str, reason: str) -> None:
        self._log_throttled("connection_shed", source=source, reason=reason)

    async def _admitted(self, tcp: trio.SocketStream, source: str) -> None:
        key = _source_key(source)
        if self._per_source.get(key, 0) >= self.options.max_per_source:
            self._shed(source, "too_many_connections_from_source")
            return
        if len(self._anonymous) >= self.options.max_connections:
            # Full: the oldest anonymous connection makes room. Refusing the newest
            # instead would let a flood that keeps the pool full lock everyone out,
            # sidecars coming to show their certificate included.
            oldest = next(iter(self._anonymous))
            del self._anonymous[oldest]
            oldest.cancel()
            self._shed(source, "anonymous_pool_full")
        scope = trio.CancelScope()
        self._anonymous[scope] = None
        self._per_source[key] = self._per_source.get(key, 0) + 1
        anonymous = True

        def leave_anonymous_pool() -> None:
            nonlocal anonymous
            if anonymous:
                anonymous = False
                self._anonymous.pop(scope, None)
                left = self._per_source[key] - 1
                if left:
                    self._per_source[key] = left
                else:
                    del self._per_source[key]

        try:
            with scope:
                assert self._creds is not None
                stream = trio.SSLStream(tcp, self._creds.context, server_side=True)
                try:
                    with trio.fail_after(self.options.handshake_timeout):
                        await stream.do_handshake()
                except (trio.TooSlowError, trio.BrokenResourceError, ssl.SSLError, OSError) as exc:
                    slow = isinstance(exc, trio.TooSlowError)
                    self._log_throttled(
                        "handshake_failed",
                        source=source,
                        reason="handshake_timeout" if slow else "tls_error",
                        detail=type(exc).__name__,
                    )
                    return
                der = stream.getpeercert(binary_form=True)
                peer_cert = x509.load_der_x509_certificate(der) if der else None
                if peer_cert is None:
                    await self._serve_http(stream, source, None)
                    return
            if scope.cancelled_caught:
                return
            # The handshake verified the certificate against our bundle: a sidecar.
            leave_anonymous_pool()
            if self._authenticated >= self.options.max_authenticated:
                self._shed(source, "too_many_authenticated_connections")
                return
            self._authenticated += 1
            try:
                await self._serve_http(stream, source, peer_cert)
            finally:
                self._authenticated -= 1
        finally:
            leave_anonymous_pool()


def _source_key(address: str) -> str:
    """What the per-source cap counts by: an IPv4 address, or an IPv6 /64.

    One IPv6 host usually holds a whole /64, and would otherwise have 2**64
    sources to spread a flood over.
    """
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def _remove_stale_key_files(directory: Path) -> None:
    """Remove server key files an older version wrote and a killed process left behind."""
    with contextlib.suppress(OSError):
        for path in directory.glob(".*-*.key"):
            with contextlib.suppress(OSError):
                path.unlink()
        for path in directory.glob(".*-*.pem"):
            with contextlib.suppress(OSError):
                path.unlink()


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
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if exc.errno == errno.EADDRINUSE:
            raise StateError(
                f"cannot listen on {where}: another process is listening there (another "
                "meshid ca serve?); stop it, or give another --listen",
                reason="address_in_use",
            ) from None
        raise StateError(
            f"cannot listen on {where}: {exc.strerror}", reason="listen_failed"
        ) from None
    return sock
