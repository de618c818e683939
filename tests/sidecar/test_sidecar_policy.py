"""A policy change re-checks every live connection and closes exactly those it now denies."""

from __future__ import annotations

import trio
from conftest import Mesh
from sidecar_helpers import API, WEB, Backend, connect, metric, receive_exactly, sid, wait_cut

from meshid.policy import Policy
from meshid.spiffeid import SpiffeId

DB = sid("db")


async def _echo(stream: trio.SocketStream, data: bytes) -> None:
    await stream.send_all(data)
    assert await receive_exactly(stream, len(data)) == data


async def test_install_policy_closes_exactly_the_denied_connections(
    mesh: Mesh, backend: Backend
) -> None:
    both = [("web", "api"), ("db", "api")]
    api = await mesh.start("api", forward=backend.addr, allow=both)
    web = await mesh.start("web", outbound=[("api", api.inbound)], allow=both)
    db = await mesh.start("db", outbound=[("api", api.inbound)], allow=both)
    with trio.fail_after(20):
        from_web = await connect(web.outbound())
        from_db = await connect(db.outbound())
        async with from_web, from_db:
            await _echo(from_web, b"web")
            await _echo(from_db, b"db")
            closed = api.sidecar.install_policy(
                Policy.build([(SpiffeId.parse(DB), SpiffeId.parse(API))], version=7)
            )
            assert await wait_cut(from_web) == b""
            [revoked] = await api.log.wait_for("close")
            await _echo(from_db, b"db still talks")
            # A new connection from web is refused under the new policy.
            again = await connect(web.outbound())
            async with again:
                await again.send_all(b"web again")
                assert await wait_cut(again) == b""
            [deny] = await api.log.wait_for("decision", decision="deny")
            live = metric(api.sidecar, "meshid_live_connections")
    assert live == 1  # db's
    assert closed == 1
    assert revoked["reason"] == "policy_revoked"
    assert revoked["peer_id"] == WEB
    assert deny["reason"] == "not_allowed" and deny["peer_id"] == WEB
    assert api.log.find("policy", version=7, closed_connections=1)
    assert metric(api.sidecar, "meshid_connections_closed_total", reason="policy_revoked") == 1
    assert metric(api.sidecar, "meshid_policy_version") == 7


async def test_rewritten_policy_file_closes_exactly_the_denied_connections(
    mesh: Mesh, backend: Backend
) -> None:
    pairs = [("web", "api"), ("web", "db")]
    api = await mesh.start("api", forward=backend.addr, allow=pairs)
    db = await mesh.start("db", forward=backend.addr, allow=pairs)
    web = await mesh.start("web", outbound=[("api", api.inbound), ("db", db.inbound)], allow=pairs)
    with trio.fail_after(20):
        to_api = await connect(web.outbound(0))
        to_db = await connect(web.outbound(1))
        async with to_api, to_db:
            await _echo(to_api, b"api")
            await _echo(to_db, b"db")
            # A broken policy file is refused; the allow-list in force stays.
            web.write_file("policy.toml", b"[[allow]]\nfrom = 'web'\n")
            [failed] = await web.log.wait_for("reload_failed")
            await _echo(to_api, b"api still")
            # web may no longer call api: only that connection is closed.
            web.write_policy([("web", "db")])
            [policy] = await web.log.wait_for("policy", closed_connections=1)
            assert await wait_cut(to_api) == b""
            [revoked] = await web.log.wait_for("close")
            await _echo(to_db, b"db still talks")
            again = await connect(web.outbound(0))
            async with again:
                assert await wait_cut(again) == b""
            [deny] = await web.log.wait_for("decision", decision="deny")
    assert failed["reason"] == "invalid_config"
    assert policy["version"] == 3 and policy["pairs"] == 1
    assert revoked["reason"] == "policy_revoked"
    assert revoked["peer_id"] == API
    assert deny["reason"] == "not_allowed" and deny["peer_id"] == API
    assert not db.log.find("close", reason="policy_revoked")
    sc = web.sidecar
    assert metric(sc, "meshid_connections_closed_total", reason="policy_revoked") == 1
    assert metric(sc, "meshid_policy_version") == 3
