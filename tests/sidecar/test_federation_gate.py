"""Federated trust domains at the sidecar: each peer judged by its own domain's bundle.

api/web live in example.org and hold b.example's bundle as federated. A
b.example workload is let in once the pair is allowed; b.example's authority
signing an example.org ID (the forged cross-domain certificate) is refused
`untrusted_certificate` on the inbound and on the outbound side, although
its root is in the sidecar's OpenSSL store.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import trio
from sidecar_helpers import (
    API,
    WEB,
    Backend,
    Creds,
    ForeignCa,
    TlsUpstream,
    client_context,
    connect,
    expect_refused,
    forge,
    receive_all,
    server_context,
    tls_connect,
    utcnow,
    wait_cut,
)
from sidecar_mesh import Mesh, Pki

from meshid.spiffeid import TrustDomain
from meshid.svid import certs_to_pem

B = TrustDomain("b.example")
C = TrustDomain("c.example")
B_WEB = "spiffe://b.example/web"


@pytest.fixture(scope="module")
def b_ca() -> ForeignCa:
    return ForeignCa.create(B)


def forged(b_ca: ForeignCa, spiffe_id: str) -> Creds:
    """b.example's authority signing an ID of example.org."""
    now = utcnow()
    return forge(
        uris=[spiffe_id],
        issuer=b_ca.root,
        issuer_key=b_ca.key,
        not_before=now - timedelta(minutes=1),
        not_after=now + timedelta(hours=1),
    )


async def test_inbound_judges_each_peer_by_its_own_domain(
    mesh: Mesh, backend: Backend, pki: Pki, b_ca: ForeignCa, tmp_path: Path
) -> None:
    api = await mesh.start(
        "api",
        forward=backend.addr,
        allow=[("web", "api"), (B_WEB, "api")],
        federated={B.name: certs_to_pem([b_ca.root])},
    )
    forger = client_context(tmp_path, pki.bundle_pem, forged(b_ca, WEB))
    foreign = client_context(tmp_path, pki.bundle_pem, b_ca.issue("web"))
    stranger = client_context(tmp_path, pki.bundle_pem, ForeignCa.create(C).issue("web"))
    with trio.fail_after(20):
        await expect_refused(await tls_connect(api.inbound, forger))
        [deny] = await api.log.wait_for("decision", decision="deny")
        await expect_refused(await tls_connect(api.inbound, stranger))
        [_, deny_c] = await api.log.wait_for("decision", decision="deny", count=2)
        stream = await tls_connect(api.inbound, foreign)
        async with stream:
            await stream.send_all(b"ping")
            assert await stream.receive_some(100) == b"ping"
        [allow] = await api.log.wait_for("decision", decision="allow")
    assert deny["reason"] == "untrusted_certificate", deny
    assert deny["peer_id"] == WEB
    assert deny_c["reason"] == "untrusted_trust_domain", deny_c
    assert allow["peer_id"] == B_WEB
    assert backend.accepted == 1


async def test_a_federated_peer_needs_an_allowed_pair(
    mesh: Mesh, backend: Backend, pki: Pki, b_ca: ForeignCa, tmp_path: Path
) -> None:
    api = await mesh.start(
        "api",
        forward=backend.addr,
        allow=[("web", "api")],
        federated={B.name: certs_to_pem([b_ca.root])},
    )
    foreign = client_context(tmp_path, pki.bundle_pem, b_ca.issue("web"))
    with trio.fail_after(20):
        await expect_refused(await tls_connect(api.inbound, foreign))
        [deny] = await api.log.wait_for("decision", decision="deny")
    assert deny["reason"] == "not_allowed", deny
    assert deny["peer_id"] == B_WEB
    assert backend.accepted == 0


async def test_outbound_refuses_an_upstream_forged_by_a_federated_authority(
    mesh: Mesh, nursery: trio.Nursery, pki: Pki, b_ca: ForeignCa, tmp_path: Path
) -> None:
    impostor = TlsUpstream(server_context(tmp_path, forged(b_ca, API)))
    genuine = TlsUpstream(server_context(tmp_path, pki.issue("api")))
    await nursery.start(impostor.serve)
    await nursery.start(genuine.serve)
    web = await mesh.start(
        "web",
        outbound=[("api", impostor.addr), ("api", genuine.addr)],
        allow=[("web", "api")],
        federated={B.name: certs_to_pem([b_ca.root])},
    )
    with trio.fail_after(20):
        stream = await connect(web.outbound(0))
        async with stream:
            await stream.send_all(b"secret for api")
            assert await wait_cut(stream) == b""
        [deny] = await web.log.wait_for("decision", decision="deny")
        stream = await connect(web.outbound(1))
        async with stream:
            assert await receive_all(stream) == b"upstream says hi"
        [allow] = await web.log.wait_for("decision", decision="allow")
    assert deny["reason"] == "untrusted_certificate", deny
    assert deny["direction"] == "outbound"
    assert allow["peer_id"] == API
