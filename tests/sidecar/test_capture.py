"""Captured connections routed by their original destination, over real mTLS on 127.0.0.1.

`SO_ORIGINAL_DST` needs the kernel's capture rules (tests/netns covers that);
here the one getsockopt is replaced by the destination the rules would have
recorded, and everything else is real: web's capture looks the destination up
in the address map, requires that identity of api's inbound sidecar, applies
the allow-list, and an unmapped destination is refused or passed through.
"""

from __future__ import annotations

import socket

import pytest
import trio
from sidecar_helpers import (
    Addr,
    Backend,
    connect,
    metric,
    receive_all,
    roundtrip,
    sid,
    wait_cut,
)
from sidecar_mesh import Pair, Running

from meshid.spiffeid import SpiffeId
from sidecar.capture import Capture
from sidecar.peer import INBOUND, OUTBOUND
from sidecar.transparent import Transparent

pytestmark = pytest.mark.trio


async def capture_listener(
    nursery: trio.Nursery,
    running: Running,
    config: Transparent,
    original: Addr,
    direction: str = OUTBOUND,
) -> tuple[Capture, Addr]:
    """A capture port on 127.0.0.1:0 whose connections all 'were going to' `original`."""
    capture = Capture(running.sidecar.connections, config, original_dst=lambda _s: original)
    running.sidecar.connections.mark = None  # marking needs CAP_NET_ADMIN; tests/netns marks
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen()
    lsock.setblocking(False)
    handler = capture.outbound_handler() if direction == OUTBOUND else capture.inbound_handler()
    addr = lsock.getsockname()[:2]

    async def serve() -> None:
        try:
            connections = running.sidecar.connections
            await connections.accept_loop(lsock, trio.CancelScope(), nursery, handler, direction)
        finally:
            lsock.close()

    nursery.start_soon(serve)
    return capture, addr


async def read_to_end(stream: trio.SocketStream) -> bytes:
    """What the sidecar sent before closing; a reset (the refusal of a connection) is the end."""
    try:
        return await receive_all(stream)
    except trio.BrokenResourceError:
        return b""


def api_id() -> SpiffeId:
    return SpiffeId.parse(sid("api"))


async def test_mapped_destination_gets_mtls_with_the_mapped_identity(
    nursery: trio.Nursery, pair: Pair
) -> None:
    api = pair.api.inbound
    capture, port = await capture_listener(nursery, pair.web, Transparent(), api)
    capture.install_map({api: api_id()})
    with trio.fail_after(10):
        assert await roundtrip(port, b"hello through the capture") == b"hello through the capture"
        allowed = await pair.web.log.wait_for("decision", decision="allow", direction=OUTBOUND)
    assert allowed[-1]["upstream"] == f"{api[0]}:{api[1]}"
    assert allowed[-1]["original_dst"] == f"{api[0]}:{api[1]}"
    assert allowed[-1]["peer_id"] == sid("api")


async def test_wrong_identity_in_the_map_is_refused(nursery: trio.Nursery, pair: Pair) -> None:
    api = pair.api.inbound
    capture, port = await capture_listener(nursery, pair.web, Transparent(), api)
    capture.install_map({api: SpiffeId.parse(sid("db"))})
    with trio.fail_after(10):
        async with await connect(port) as stream:
            await stream.send_all(b"x")
            assert await read_to_end(stream) == b""
        await pair.web.log.wait_for("decision", decision="deny", direction=OUTBOUND)


async def test_unmapped_destination_is_refused(nursery: trio.Nursery, pair: Pair) -> None:
    _, port = await capture_listener(nursery, pair.web, Transparent(), pair.api.inbound)
    with trio.fail_after(10):
        async with await connect(port) as stream:
            assert await read_to_end(stream) == b""
        denied = await pair.web.log.wait_for("decision", reason="unknown_destination")
    assert denied[0]["decision"] == "deny"
    assert denied[0]["original_dst"] == "{}:{}".format(*pair.api.inbound)
    assert pair.api.log.find("decision") == []  # nothing reached api


async def test_unmapped_destination_passes_through_when_configured(
    nursery: trio.Nursery, pair: Pair, backend: Backend
) -> None:
    config = Transparent(unknown_destination="passthrough")
    _, port = await capture_listener(nursery, pair.web, config, backend.addr)
    with trio.fail_after(10):
        assert await roundtrip(port, b"plain") == b"plain"
        await pair.web.log.wait_for("decision", decision="passthrough")
    assert metric(pair.web.sidecar, "meshid_connections_total", decision="passthrough") == 1


async def test_not_allowed_pair_is_refused_before_connecting(
    nursery: trio.Nursery, pair: Pair
) -> None:
    pair.web.write_policy([])
    with trio.fail_after(10):
        await pair.web.log.wait_for("policy", pairs=0)
    api = pair.api.inbound
    capture, port = await capture_listener(nursery, pair.web, Transparent(), api)
    capture.install_map({api: api_id()})
    with trio.fail_after(10):
        async with await connect(port) as stream:
            assert await read_to_end(stream) == b""
        await pair.web.log.wait_for("decision", decision="deny", reason="not_allowed")


async def test_inbound_capture_refuses_plaintext(
    nursery: trio.Nursery, pair: Pair, backend: Backend
) -> None:
    config = Transparent(app_ports=(backend.addr[1],))
    _, port = await capture_listener(nursery, pair.api, config, backend.addr, INBOUND)
    with trio.fail_after(10):
        async with await connect(port) as stream:
            await stream.send_all(b"GET / HTTP/1.1\r\nHost: api\r\n\r\n")
            assert b"200" not in await read_to_end(stream)
        await pair.api.log.wait_for("decision", reason="plaintext_http")
    assert backend.accepted == 0


async def test_inbound_capture_refuses_a_port_that_is_not_an_app_port(
    nursery: trio.Nursery, pair: Pair, backend: Backend
) -> None:
    _, port = await capture_listener(nursery, pair.api, Transparent(), backend.addr, INBOUND)
    with trio.fail_after(10):
        async with await connect(port) as stream:
            assert await read_to_end(stream) == b""
        await pair.api.log.wait_for("decision", reason="unknown_destination")
    assert backend.accepted == 0


async def test_policy_deny_cuts_a_live_captured_connection(
    nursery: trio.Nursery, pair: Pair
) -> None:
    api = pair.api.inbound
    capture, port = await capture_listener(nursery, pair.web, Transparent(), api)
    capture.install_map({api: api_id()})
    with trio.fail_after(10):
        async with await connect(port) as stream:
            await stream.send_all(b"ping")
            assert await stream.receive_some(4) == b"ping"  # established, through to the echo
            pair.web.write_policy([])
            with trio.fail_after(2):
                await wait_cut(stream)
            closed = await pair.web.log.wait_for("close", reason="policy_revoked")
    assert closed[0]["peer_id"] == sid("api")
    # The cut names where the app was going, as the decision that let it through did.
    host, port_ = api
    assert closed[0]["original_dst"] == f"{host}:{port_}"


async def test_a_connection_to_the_capture_port_itself_is_refused_not_looped(
    nursery: trio.Nursery, pair: Pair
) -> None:
    """Dialled directly, its original destination is the capture port: passing it on would loop."""
    config = Transparent(unknown_destination="passthrough")
    holder: list[Addr] = []
    capture, port = await capture_listener(nursery, pair.web, config, ("127.0.0.1", 1))
    capture.original_dst = lambda _s: holder[0]
    holder.append(port)
    with trio.fail_after(10):
        async with await connect(port) as stream:
            assert await read_to_end(stream) == b""
        await pair.web.log.wait_for("decision", reason="unknown_destination", decision="deny")
    assert pair.web.log.find("decision", decision="passthrough") == []
