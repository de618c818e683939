"""The sidecar's own connections carry the mark the capture rules skip (needs CAP_NET_ADMIN).

Without it, the sidecar's connection to an upstream or to the authority would
be captured into its own outbound port: a loop, or a sidecar that cannot enroll.
"""

from __future__ import annotations

import os
import socket

import pytest
import trio

from meshid.spiffeid import TrustDomain
from sidecar.config import Address
from sidecar.control import ControlClient
from sidecar.sockets import SO_MARK, connect

pytestmark = [
    pytest.mark.trio,
    pytest.mark.skipif(os.geteuid() != 0, reason="SO_MARK needs CAP_NET_ADMIN"),
]

MARK = 0x6D6964


async def test_data_and_control_connections_are_marked(nursery: trio.Nursery) -> None:
    listeners = await nursery.start(trio.serve_tcp, lambda s: s.aclose(), 0)
    port = listeners[0].socket.getsockname()[1]
    with trio.fail_after(5):
        sock = await connect(Address("127.0.0.1", port), 5.0, MARK)
        try:
            assert sock.getsockopt(socket.SOL_SOCKET, SO_MARK) == MARK
        finally:
            sock.close()
        client = ControlClient("127.0.0.1", port, TrustDomain.parse("example.org"), mark=MARK)
        stream = await client._open_tcp()
        async with stream:
            assert stream.socket.getsockopt(socket.SOL_SOCKET, SO_MARK) == MARK
        unmarked = await connect(Address("127.0.0.1", port), 5.0)
        try:
            assert unmarked.getsockopt(socket.SOL_SOCKET, SO_MARK) == 0
        finally:
            unmarked.close()
