"""A kept connection that the server drops under the next request, unanswered.

The server holds our authority's own certificate, answers the first request
on a connection and keeps it open, then reads the second and closes without
a word, as an authority whose idle timeout crossed the request would. A GET
is sent again on a fresh connection; a POST (a renewal: each one issues an
SVID) is not repeated, the caller hears the failure. Real TLS on 127.0.0.1
port 0.
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
from sidecar.control import POOL_SIZE, ControlClient, ControlPlaneError, HeldIdentity

OK = b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{"n": 1234}'


@pytest.mark.parametrize(("method", "repeated"), [("GET", True), ("POST", False)])
async def test_a_request_lost_on_a_kept_connection_is_repeated_only_when_safe(
    tmp_path: Path, nursery: trio.Nursery, method: str, repeated: bool
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
            if repeated:
                assert await call() == {"n": 1234}
                assert heard == [1, 1, 2]  # sent again, once, on a fresh connection
            else:
                with pytest.raises(ControlPlaneError) as info:
                    await call()
                assert info.value.reason == "authority_unreachable", info.value
                assert heard == [1, 1]  # not repeated
    finally:
        client.drop()
        authority.close()
