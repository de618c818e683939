"""The admin listener: /healthz, /readyz, /metrics, /svid over plain HTTP/1.1 (h11).

Meant for loopback or a pod-local probe port: it exposes no secret, only
state an operator or Prometheus needs. Each client gets a read deadline and a
cap on the request head, so a slow or hostile client costs little.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import h11
import trio

from sidecar.config import Address

MAX_REQUEST_HEAD = 16 * 1024
READ_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"


Router = Callable[[str, str], Response]


async def _handle(stream: trio.SocketStream, route: Router) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
    try:
        while True:
            with trio.move_on_after(READ_TIMEOUT) as deadline:
                event = conn.next_event()
                while event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(16384))
                    event = conn.next_event()
            if deadline.cancelled_caught or not isinstance(event, h11.Request):
                return
            target = event.target.decode("ascii", "replace").split("?", 1)[0]
            reply = route(event.method.decode("ascii", "replace"), target)
            headers = [
                ("content-type", reply.content_type),
                ("content-length", str(len(reply.body))),
                ("cache-control", "no-store"),
            ]
            await stream.send_all(
                conn.send(h11.Response(status_code=reply.status, headers=headers))
            )
            await stream.send_all(conn.send(h11.Data(data=reply.body)) or b"")
            await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
            # Read the (empty) rest of the request before the next one.
            while conn.their_state is h11.SEND_BODY:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(16384))
                elif isinstance(event, h11.EndOfMessage):
                    break
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()
    except h11.RemoteProtocolError as exc:
        if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            body = b"bad request\n"
            headers = [("content-type", "text/plain"), ("content-length", str(len(body)))]
            try:
                await stream.send_all(
                    conn.send(h11.Response(status_code=exc.error_status_hint, headers=headers))
                    or b""
                )
                await stream.send_all(conn.send(h11.Data(data=body)) or b"")
            except (h11.LocalProtocolError, trio.BrokenResourceError):
                pass
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await stream.aclose()


async def serve_admin(
    listen: Address,
    route: Router,
    *,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    listeners = await trio.open_tcp_listeners(listen.port, host=listen.host)

    async def handler(stream: trio.SocketStream) -> None:
        await _handle(stream, route)

    await trio.serve_listeners(handler, listeners, task_status=task_status)
