"""The sidecar's admin listener: /healthz, /readyz, /metrics, /svid (`adminhttp` underneath).

The server itself, with its deadlines, connection caps and failure boundary,
is shared with the authority's metrics listener and lives in `adminhttp`;
this module only binds it to the sidecar's `[admin] listen` address.
"""

from __future__ import annotations

import trio

from adminhttp import (
    AdminLimits,
    AdminServer,
    Gate,
    Reply,
    Response,
    Router,
    Throttle,
    answer,
    plain,
    serve_admin_listeners,
)
from adminhttp import serve_admin as serve_http
from meshid.events import EventLog
from sidecar.config import Address

__all__ = [
    "AdminLimits",
    "AdminServer",
    "Gate",
    "Reply",
    "Response",
    "Router",
    "Throttle",
    "answer",
    "plain",
    "serve_admin",
    "serve_admin_listeners",
]


async def serve_admin(
    listen: Address,
    route: Router,
    *,
    limits: AdminLimits | None = None,
    events: EventLog | None = None,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Open the admin listener on `listen` and serve it until cancelled."""
    await serve_http(
        listen.host, listen.port, route, limits=limits, events=events, task_status=task_status
    )
