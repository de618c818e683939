"""PROXY protocol v2 towards the local app: the peer's address and SPIFFE ID, then the bytes."""

from __future__ import annotations

import pytest
import trio
from sidecar_helpers import WEB, Backend, fmt, receive_all, roundtrip
from sidecar_mesh import Mesh, start_pair

from sidecar.proxyproto import PP2_TYPE_SPIFFE_ID, PP2_TYPE_SSL, SIGNATURE, decode_v2


@pytest.mark.parametrize(
    ("enabled", "host"), [(True, "127.0.0.1"), (True, "::1"), (False, "127.0.0.1")]
)
async def test_proxy_protocol_header_to_the_local_app(enabled: bool, host: str, mesh: Mesh) -> None:
    seen: list[bytes] = []

    async def app(stream: trio.SocketStream) -> None:
        seen.append(await receive_all(stream, limit=1 << 16))
        await stream.send_all(b"ok")

    backend = Backend(app)
    await mesh.nursery.start(backend.serve)
    pair = await start_pair(mesh, backend, proxy_protocol=enabled, host=host)
    payload = b"payload after the header"
    with trio.fail_after(20):
        assert await roundtrip(pair.app, payload) == b"ok"
        [allow] = await pair.api.log.wait_for("decision", decision="allow")
    [raw] = seen
    if not enabled:
        assert raw == payload
        return
    src, dst, tlvs, length = decode_v2(raw)
    assert raw.startswith(SIGNATURE)
    # The source is web's sidecar as api saw it; the destination is api's mTLS port.
    assert fmt(src) == allow["peer_addr"]
    assert src[0] == dst[0] == host
    assert dst == pair.api.inbound
    assert tlvs[PP2_TYPE_SPIFFE_ID].decode() == WEB
    assert PP2_TYPE_SSL in tlvs
    assert raw[length:] == payload
