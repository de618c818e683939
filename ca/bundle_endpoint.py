"""The SPIFFE bundle endpoint (`ca serve --bundle-endpoint`), `https_spiffe` profile.

Theory of operation. Per the SPIFFE Federation specification, a federated
trust domain fetches our bundle with an HTTPS GET; the endpoint authenticates
with an X.509-SVID for its endpoint ID (ours: the control plane's own ID,
`spiffe://TD/meshid/authority`, the very credentials the control plane
serves with, renewed and re-signed across root rollovers) and asks for no
client certificate. The body is the SPIFFE bundle (a JWK Set with
`spiffe_sequence` and `spiffe_refresh_hint`), the same document as the
control plane's GET /v1/bundle.

This listener answers GET and HEAD with the bundle, on any path, and nothing
else: no enrollment, no renewal. Each connection is one request, bounded in
time; the number of connections at once is capped.
"""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
from collections.abc import Callable
from typing import Any

import h11
import trio

from ca.server import ControlPlane
from meshid.reasons import Reason
from meshid.version import SERVER_HEADER

MAX_CONNECTIONS = 256  # at once; more wait in the kernel's backlog
REQUEST_TIMEOUT = 10.0  # seconds for the handshake and the request together
MAX_REQUEST = 8 * 1024


async def serve_bundle_endpoint(
    sock: socket.socket,
    plane: ControlPlane,
    log: Callable[..., None],
    *,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the bundle on `sock` (bound and listening) until cancelled; logs where."""
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    host, port = sock.getsockname()[:2]
    slots = trio.CapacityLimiter(MAX_CONNECTIONS)

    async def handle(tcp: trio.SocketStream) -> None:
        async with slots:
            try:
                with trio.move_on_after(REQUEST_TIMEOUT):
                    await _one(tcp, plane)
            except Exception as exc:  # a hostile client ends its connection, never the server
                log(
                    "internal_error",
                    reason=Reason.INTERNAL_ERROR,
                    task="bundle_endpoint",
                    error=type(exc).__name__,
                )
            finally:
                await trio.aclose_forcefully(tcp)

    async with trio.open_nursery() as nursery:
        log(
            "bundle_endpoint_serving",
            listen=f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
            endpoint_id=str(plane.identity),
        )
        task_status.started((str(host), int(port)))
        await trio.serve_listeners(handle, [listener], handler_nursery=nursery)


def _bundle_doc(plane: ControlPlane) -> dict[str, Any]:
    plane.authority.advance_roots()
    return plane.authority.bundle().to_spiffe()


async def _one(tcp: trio.SocketStream, plane: ControlPlane) -> None:
    context = plane.server_context()
    stream = trio.SSLStream(tcp, context, server_side=True)
    try:
        await stream.do_handshake()
    except (trio.BrokenResourceError, ssl.SSLError, OSError):
        return
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST)
    request: h11.Request | None = None
    while request is None:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(4096)
            conn.receive_data(bytes(data))
            if not data:
                return
        elif isinstance(event, h11.Request):
            request = event
        else:
            return
    method = request.method.decode("ascii", "replace")
    if method in ("GET", "HEAD"):
        doc = await plane.db_call(_bundle_doc, plane)
        status, body = 200, (json.dumps(doc) + "\n").encode()
    else:
        status, body = 405, b'{"error": "method_not_allowed"}\n'
    headers = [
        ("content-type", "application/json"),
        ("content-length", str(len(body))),
        ("server", SERVER_HEADER),
        ("connection", "close"),
    ]
    if status == 405:
        headers.append(("allow", "GET, HEAD"))
    out = conn.send(h11.Response(status_code=status, headers=headers))
    assert out is not None
    if method != "HEAD":
        out += conn.send(h11.Data(data=body)) or b""
    out += conn.send(h11.EndOfMessage()) or b""
    await stream.send_all(out)
    with contextlib.suppress(trio.BrokenResourceError, ssl.SSLError, OSError):
        await stream.aclose()
