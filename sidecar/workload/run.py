"""Starting the Workload API from the sidecar: the feed, the service and the server, wired."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import trio

from meshid.events import EventLog
from sidecar.credentials import Svid
from sidecar.workload.grpc import GrpcServer, Limits
from sidecar.workload.service import JwtAuthority, WorkloadFeed, WorkloadService, check_metadata
from sidecar.workload.settings import WorkloadApiConfig


class Host(Protocol):
    """What the Workload API needs of the sidecar."""

    events: EventLog
    svid_listeners: list[Callable[[Svid], None]]

    def current_svid(self) -> Svid | None: ...


@dataclass(frozen=True, slots=True)
class WorkloadApi:
    server: GrpcServer
    feed: WorkloadFeed


async def serve_workload_api(
    host: Host,
    config: WorkloadApiConfig,
    jwt: JwtAuthority | None = None,
    limits: Limits | None = None,
    *,
    task_status: trio.TaskStatus[WorkloadApi] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled; the socket is bound (or a ConfigError raised) before `started`."""
    feed = WorkloadFeed()
    current = host.current_svid()
    if current is not None:
        feed.publish(current)
    host.svid_listeners.append(feed.publish)
    server = GrpcServer(
        WorkloadService(feed, jwt).handlers(),
        admit=lambda peer: config.admits(peer.uid, peer.gid),
        check=check_metadata,
        limits=limits,
        events=host.events,
    )
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve, config.socket)
            host.events.emit("workload_api_listening", socket=str(config.socket))
            task_status.started(WorkloadApi(server, feed))
    finally:
        host.svid_listeners.remove(feed.publish)
