"""The `meshid ca serve` process: one worker, or several forked ones sharing the port.

Theory of operation: the listening sockets (one per worker, in a SO_REUSEPORT
group) and the shared failure limiter are made before the fork; each worker
opens its own authority and runs its own event loop. The parent only forwards
signals and, if a worker dies, stops the others and exits non-zero. A parent
that dies without a word (SIGKILL, the OOM killer) cannot stop its workers, so
each asks the kernel for SIGTERM when its parent goes (`_exit_with_parent`).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import ipaddress
import os
import resource
import signal
import socket
import traceback
from collections.abc import Callable

import trio

from ca.authority import Authority
from ca.bundle_endpoint import serve_bundle_endpoint
from ca.federation_refresh import refresh_federated_bundles
from ca.limits import SharedFailureLimiter
from ca.metrics import serve_metrics
from ca.plane import ServerOptions
from ca.server import ControlPlane, bind_listener
from meshid.clock import Clock
from meshid.errors import MeshIdError, StateError
from meshid.ratelimit import FailureLimiter
from meshid.svid import IpAddress


def _serve_one(
    open_authority: Callable[[], Authority],
    options: ServerOptions,
    sock: socket.socket,
    log: Callable[..., None],
    limiter: FailureLimiter | None = None,
    metrics_sock: socket.socket | None = None,
    ui_sock: socket.socket | None = None,
    *,
    clock: Clock,
    bundle_sock: socket.socket | None = None,
    refresher: bool = True,
) -> None:
    """One worker: its own database connection, its own event loop, the shared socket."""
    authority = open_authority()
    plane = ControlPlane(authority, options, log=log, clock=clock, limiter=limiter)

    async def main() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                await nursery.start(plane.serve, sock)
                tune_gc()
                if metrics_sock is not None:
                    await nursery.start(serve_metrics, metrics_sock, plane.metrics, log)
                if ui_sock is not None:
                    from ca.ui import serve_ui

                    await nursery.start(serve_ui, ui_sock, plane.graph, log)
                if bundle_sock is not None:
                    await nursery.start(serve_bundle_endpoint, bundle_sock, plane, log)
                if refresher:
                    await nursery.start(refresh_federated_bundles, plane, log)
                async for signum in signals:
                    log("stopping", signal=signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    break

    try:
        trio.run(main)
    except BaseExceptionGroup as group:
        matched, _ = group.split(MeshIdError)
        if matched is None:
            raise
        first: BaseException = matched.exceptions[0]
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from None
    finally:
        authority.close()


GC_YOUNG = 50_000  # allocations between two collections of the youngest generation


def tune_gc() -> None:
    """Make the cyclic garbage collector cheaper for a server holding thousands of connections.

    Each connection keeps a few hundred objects the collector tracks (its task,
    cancel scopes, HTTP state); at 10,000 sidecars it took about a fifth of the
    authority's CPU (py-spy --native), most of it scanning the same live
    objects again. What the server made before it answered anyone (modules,
    the authority, its credentials) lives as long as the process: frozen out
    of the collector's sight. The youngest generation is collected every
    GC_YOUNG allocations rather than 700: fewer trips through the survivors.
    Reference counting still frees everything that is not in a cycle at once.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG, *gc.get_threshold()[1:])


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _exit_with_parent(parent: int) -> None:
    """In a forked worker: be sent SIGTERM when the parent dies, or leave now if it has.

    The request is for the thread that forked, and the parent may have died
    between the fork and the request (the signal would then never come): so
    the worker checks afterwards that its parent is still the one it had.
    """
    with contextlib.suppress(OSError, AttributeError):  # not Linux: the parent's SIGTERM only
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


FILE_RESERVE = 64  # descriptors beside connections: the database, listeners, logs


def _raise_file_limit(options: ServerOptions, log: Callable[..., None]) -> None:
    """Lift the soft descriptor limit to what the connection caps need, if the hard one allows.

    Past the limit, accept() fails and trio waits and retries: new connections
    queue in the kernel, and the anonymous pool's make-room rule never gets to
    run. That is worth a log line; a limit that holds the anonymous pool but
    not every authenticated connection is not (sidecars are few next to floods).
    """
    need = options.max_connections + options.max_authenticated + FILE_RESERVE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= need:
        return
    target = need if hard == resource.RLIM_INFINITY else min(need, hard)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    if soft < options.max_connections + FILE_RESERVE:
        log("file_limit", reason="file_limit_low", limit=soft, needed=need)


def run_server(
    open_authority: Callable[[], Authority],
    options: ServerOptions,
    log: Callable[..., None],
    workers: int = 1,
    *,
    clock: Clock,
    shared_database: bool = False,
) -> int:
    """Serve until SIGTERM/SIGINT; returns the exit status.

    With several workers, the port is bound once and each worker is a forked
    process with its own database connection and event loop (Python runs one
    thread at a time, so processes are how the control plane uses more than
    one core). The parent only forwards signals and watches: if a worker
    dies, the others are stopped and the parent exits non-zero, for the
    service manager to restart the whole set.
    """
    if workers <= 1:
        sock = bind_listener(options.host, options.port)
        [metrics_sock] = _bind_metrics(options.metrics, 1)
        [ui_sock] = _bind_metrics(options.ui, 1, "--ui")
        bundle_sock = _bind_bundle_endpoint(options)
        _raise_file_limit(options, log)
        _serve_one(
            open_authority,
            options,
            sock,
            log,
            metrics_sock=metrics_sock,
            ui_sock=ui_sock,
            clock=clock,
            bundle_sock=bundle_sock,
        )
        return 0
    # One listening socket per worker in a SO_REUSEPORT group: the kernel spreads new
    # connections across them evenly (one shared socket let one worker take most).
    first = bind_listener(options.host, options.port, reuse_port=True)
    port = int(first.getsockname()[1])
    socks = [first]
    try:
        socks += [bind_listener(options.host, port, reuse_port=True) for _ in range(workers - 1)]
    except MeshIdError:
        for sock in socks:
            sock.close()
        raise
    metrics_socks = _bind_metrics(options.metrics, workers)
    ui_socks = _bind_metrics(options.ui, workers, "--ui")
    # One socket for all workers: each accepts from it (federation fetches are rare).
    bundle_sock = _bind_bundle_endpoint(options)
    _raise_file_limit(options, log)
    # Created before the fork, so every worker counts enrollment failures in one table;
    # on a shared database each worker counts in the database instead (ca.pgshared).
    limiter = None if shared_database else SharedFailureLimiter(max_failures=5)
    children: dict[int, int] = {}
    parent = os.getpid()
    for index in range(workers):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child, which never returns
            status = 1
            try:
                _exit_with_parent(parent)
                for other, sock in enumerate(socks):
                    if other != index:
                        sock.close()
                for other, msock in enumerate(metrics_socks + ui_socks):
                    if other % workers != index and msock is not None:
                        msock.close()
                _serve_one(
                    open_authority,
                    options,
                    socks[index],
                    lambda event, i=index, **f: log(event, worker=i, **f),
                    limiter,
                    metrics_socks[index],
                    ui_socks[index],
                    clock=clock,
                    bundle_sock=bundle_sock,
                    refresher=index == 0,  # one worker fetches federated bundles
                )
                status = 0
            except MeshIdError as exc:
                log("worker_failed", worker=index, reason=exc.reason, detail=exc.message)
            except BaseException:
                traceback.print_exc()  # a bug: show it; the parent stops the set
            finally:
                os._exit(status)
        children[pid] = index
    for sock in socks:
        sock.close()
    for msock in metrics_socks + ui_socks:
        if msock is not None:
            msock.close()
    if bundle_sock is not None:
        bundle_sock.close()
    stopping = False
    status = 0

    def stop_all(signum: int = signal.SIGTERM, _frame: object = None) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop_all)
    signal.signal(signal.SIGINT, stop_all)
    while children:
        try:
            pid, wait_status = os.wait()
        except ChildProcessError:
            break
        index = children.pop(pid)
        code = os.waitstatus_to_exitcode(wait_status)
        if not stopping:
            log("worker_died", worker=index, exit_code=code)
            status = 1
            stop_all()
    return status


def parse_listen(text: str, flag: str = "--listen") -> tuple[str, int]:
    """HOST:PORT or [V6]:PORT."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise StateError(f"{flag} {text!r}: expected HOST:PORT", reason="invalid_address")
    host = host.strip("[]")
    if not host:
        raise StateError(f"{flag} {text!r}: expected HOST:PORT", reason="invalid_address")
    return host, int(port)


def _bind_bundle_endpoint(options: ServerOptions) -> socket.socket | None:
    if options.bundle_endpoint is None:
        return None
    return bind_listener(*options.bundle_endpoint)


def _bind_metrics(
    where: tuple[str, int] | None, workers: int, flag: str = "--metrics"
) -> list[socket.socket | None]:
    """One socket per worker (metrics or the UI), on consecutive ports (port 0: each its own)."""
    if where is None:
        return [None] * workers
    host, port = where
    if port and port + workers - 1 > 65535:
        raise StateError(
            f"{flag}: ports {port}..{port + workers - 1} (one per worker) pass 65535",
            reason="invalid_address",
        )
    socks: list[socket.socket | None] = []
    try:
        for index in range(workers):
            socks.append(bind_listener(host, port + index if port else 0))
    except MeshIdError:
        for sock in socks:
            if sock is not None:
                sock.close()
        raise
    return socks


def default_names(host: str) -> tuple[tuple[str, ...], tuple[IpAddress, ...]]:
    """SANs for the listen host when the operator named none: its IP, or its DNS name."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return (host,), ()
    if ip.is_unspecified:
        return ("localhost",), (ipaddress.ip_address("127.0.0.1"),)
    return (), (ip,)
