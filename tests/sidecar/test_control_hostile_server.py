"""A server in `authority.server` that answers one byte at a time, for ever.

It holds our authority's own certificate, so TLS and the identity check pass;
only the deadline of the whole request can end it. Real TLS on 127.0.0.1
port 0.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import trio
from sidecar_helpers import utcnow
from test_sidecar_control_failures import control_plane, make_authority

from sidecar.control import ControlClient, ControlPlaneError
from sidecar.failures import another_server_may_answer

DRIP = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n" + b"x" * 10_000


async def test_a_server_that_answers_byte_by_byte_is_given_up_at_the_deadline(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    authority = make_authority(tmp_path / "authority")
    context = control_plane(authority).plane._issue_credentials().context
    sent = 0

    async def drip(tcp: trio.SocketStream) -> None:
        nonlocal sent
        stream = trio.SSLStream(tcp, context, server_side=True)
        try:
            await stream.receive_some(65536)  # the request
            for byte in DRIP:  # bounded: at 10 ms a byte, far past the client's deadline
                await stream.send_all(bytes([byte]))
                sent += 1
                await trio.sleep(0.01)
        except trio.BrokenResourceError:
            pass  # the client gave up: the point
        finally:
            await trio.aclose_forcefully(stream)

    (listener,) = await nursery.start(functools.partial(trio.serve_tcp, drip, 0, host="127.0.0.1"))
    port = listener.socket.getsockname()[1]
    client = ControlClient("127.0.0.1", port, authority.trust_domain, timeout=0.5)
    with trio.fail_after(10):
        with pytest.raises(ControlPlaneError) as info:
            await client.request(
                "GET", "/v1/bundle", None, bundle_pem=authority.bundle().to_pem(), now=utcnow()
            )
    assert info.value.reason == "authority_unreachable", info.value
    assert "did not answer in time" in info.value.message
    assert another_server_may_answer(info.value.status, info.value.reason)  # the next is asked
    assert 0 < sent < len(DRIP)  # it was answering, slowly, when the client gave up
