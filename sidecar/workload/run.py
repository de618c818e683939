"""Starting the Workload API from the sidecar: the feed, the service and the server, wired."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

import trio
from prometheus_client import CollectorRegistry, Counter, Gauge

from meshid.events import EventLog
from meshid.jwtsvid import SigningKey
from meshid.spiffeid import SpiffeId
from sidecar.credentials import Svid
from sidecar.workload.grpc import GrpcServer, Limits
from sidecar.workload.jwt import Call, ControlPlaneJwt, LocalJwt, load_signing_key
from sidecar.workload.service import WorkloadFeed, WorkloadService, check_metadata
from sidecar.workload.settings import WorkloadApiConfig
from sidecar.workload.unixsocket import bind_unix, remove_if_ours


class Host(Protocol):
    """What the Workload API needs of the sidecar."""

    identity: SpiffeId
    events: EventLog
    svid_listeners: list[Callable[[Svid], None]]

    def current_svid(self) -> Svid | None: ...

    def wall_now(self) -> datetime: ...


@dataclass(frozen=True, slots=True)
class WorkloadApi:
    server: GrpcServer
    feed: WorkloadFeed
    jwt: ControlPlaneJwt | LocalJwt | None


@dataclass(eq=False, slots=True)
class Prepared:
    """What can fail for a bad config, done before anything runs: the key read, the socket bound."""

    config: WorkloadApiConfig
    sock: trio.socket.SocketType
    inode: int
    jwt_key: SigningKey | None

    def close(self) -> None:
        """Idempotent: the sidecar calls it on exit, whether or not the server ever ran."""
        self.sock.close()
        remove_if_ours(self.config.socket, self.inode)


def prepare_workload_api(config: WorkloadApiConfig) -> Prepared:
    """Sync, raises ConfigError naming the key: called with the other listeners' binds."""
    key = load_signing_key(config.jwt_key) if config.jwt_key is not None else None
    sock, inode = bind_unix(config.socket)
    return Prepared(config, sock, inode, key)


async def serve_workload_api(
    host: Host,
    config: WorkloadApiConfig | Prepared,
    control: Call | None = None,
    limits: Limits | None = None,
    *,
    registry: CollectorRegistry | None = None,
    task_status: trio.TaskStatus[WorkloadApi] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled; the socket is bound (or a ConfigError raised) before `started`.

    With `control` (a request to the authority: an enrolled sidecar), JWT-SVIDs
    are minted by the authority; with `jwt_key` configured (static mode) they
    are signed here; with neither, the JWT calls answer UNAVAILABLE.
    """
    prepared = config if isinstance(config, Prepared) else prepare_workload_api(config)
    config = prepared.config
    feed = WorkloadFeed()
    jwt: ControlPlaneJwt | LocalJwt | None = None
    if prepared.jwt_key is not None:
        jwt = LocalJwt(host, prepared.jwt_key)
    elif control is not None:
        jwt = ControlPlaneJwt(host, control, feed)
    current = host.current_svid()
    if current is not None:
        feed.publish(current)
    host.svid_listeners.append(feed.publish)
    handlers = WorkloadService(feed, jwt).handlers()
    calls = Counter(
        "meshid_workload_api_calls",
        "Workload API calls ended, by method and reason (ok, or why not)",
        ["method", "reason"],
        registry=registry,
    )

    def count(path: str, reason: str) -> None:
        # the path is the caller's: only known methods become label values
        method = path.rsplit("/", 1)[-1] if path in handlers else "unknown"
        calls.labels(method, reason).inc()

    server = GrpcServer(
        handlers,
        admit=lambda peer: config.admits(peer.uid, peer.gid),
        check=check_metadata,
        limits=limits,
        events=host.events,
        count=count,
    )
    Gauge(
        "meshid_workload_api_connections",
        "Connections open to the Workload API socket",
        registry=registry,
    ).set_function(lambda: server.connections)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve_bound, prepared.sock, config.socket, prepared.inode)
            if isinstance(jwt, ControlPlaneJwt):
                nursery.start_soon(jwt.run)
            host.events.emit("workload_api_listening", socket=str(config.socket))
            task_status.started(WorkloadApi(server, feed, jwt))
    finally:
        host.svid_listeners.remove(feed.publish)
        prepared.close()
