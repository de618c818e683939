"""A kept connection that the server drops under the next request, unanswered.

The server holds our authority's own certificate, answers the first request
on a connection and keeps it open, then reads the second and closes without
a word, as an authority going away under a parked watch would. Neither a
GET nor a POST (a renewal: each one issues an SVID) is sent again at once:
the caller hears the failure, and its duty's jittered retry follows, so a
restarted authority is not met by every sidecar in the same instant. Real
TLS on 127.0.0.1 port 0.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import trio
from sidecar_helpers import utcnow
from test_sidecar_control_failures import control_plane, make_authority

from meshid.spiffeid import SpiffeId
from meshid.svid import certs_to_pem, generate_key, key_to_pem
from sidecar.control import ControlClient, ControlPlaneError, HeldIdentity
from sidecar.controlpool import POOL_SIZE

OK = b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{"n": 1234}'


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_a_request_lost_after_it_went_out_is_not_sent_again_at_once(
    tmp_path: Path, nursery: trio.Nursery, method: str
) -> None:
    authority = make_authority(tmp_path / "authority")
    context = control_plane(authority).plane._issue_credentials().context
    heard: list[int] = []  # per request heard: the connection it came on

    async def answer_once_then_drop(tcp: trio.SocketStream) -> None:
        number = len({*heard}) + 1
        stream = trio.SSLStream(tcp, context, server_side=True)
        try:
            for _ in range(2):
                if not await stream.receive_some(65536):
                    return
                heard.append(number)
                if number == 1 and len(heard) == 2:
                    return  # the second request on the first connection: dropped unanswered
                await stream.send_all(OK)
        except trio.BrokenResourceError:
            pass
        finally:
            await trio.aclose_forcefully(stream)

    serve = functools.partial(trio.serve_tcp, answer_once_then_drop, 0, host="127.0.0.1")
    (listener,) = await nursery.start(serve)
    port = listener.socket.getsockname()[1]
    client = ControlClient("127.0.0.1", port, authority.trust_domain, pool_size=POOL_SIZE)
    key = generate_key()
    issued = authority.issue(SpiffeId(authority.trust_domain, "/web"), key.public_key())
    identity = HeldIdentity(key_to_pem(key) + certs_to_pem(issued.chain))

    async def call() -> dict[str, object]:
        body = None if method == "GET" else {"csr": "x"}
        return await client.request(
            method,
            "/v1/x",
            body,
            bundle_pem=authority.bundle().to_pem(),
            now=utcnow(),
            identity=identity,
        )

    try:
        with trio.fail_after(10):
            assert await call() == {"n": 1234}
            with pytest.raises(ControlPlaneError) as info:
                await call()
            assert info.value.reason == "authority_unreachable", info.value
            assert heard == [1, 1]  # not repeated
            assert client.idle() == 0  # the broken connection is not kept
            assert await call() == {"n": 1234}  # the next call: a fresh connection
            assert heard == [1, 1, 2]
    finally:
        client.drop()
        authority.close()
