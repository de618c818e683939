"""A policy change re-checks every live connection and closes exactly those it now denies."""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from OpenSSL import SSL
from sidecar_helpers import (
    API,
    WEB,
    Backend,
    client_context,
    connect,
    metric,
    receive_exactly,
    sid,
    wait_cut,
)
from sidecar_mesh import Mesh, Pki

from meshid.policy import Policy
from meshid.spiffeid import SpiffeId
from sidecar.gate import Gate

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
            pumped = len(api.sidecar.pump)
    assert live == 1  # db's
    assert pumped == 1  # the cut connection left the pump; db's is still moving
    assert closed == 1
    assert revoked["reason"] == "policy_revoked"
    assert revoked["peer_id"] == WEB
    assert deny["reason"] == "not_allowed" and deny["peer_id"] == WEB
    assert api.log.find("policy", version=7, closed_connections=1)
    assert metric(api.sidecar, "meshid_connections_closed_total", reason="policy_revoked") == 1
    assert metric(api.sidecar, "meshid_policy_version") == 7
    # both reach the status report: one cut by the change, one refused after it
    refusals = api.sidecar.status_report("api-0").refusals
    assert sorted((str(r.peer_id), r.kind, r.reason, r.count) for r in refusals) == [
        (WEB, "cut", "policy_revoked", 1),
        (WEB, "deny", "not_allowed", 1),
    ]


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


def _tls_records(data: bytes) -> list[bytes]:
    records, pos = [], 0
    for _ in range(len(data)):
        if pos >= len(data):
            break
        length = int.from_bytes(data[pos + 3 : pos + 5], "big")
        records.append(data[pos : pos + 5 + length])
        pos += 5 + length
    return records


async def _client_with_a_pause(
    addr: tuple[str, int], ctx: ssl.SSLContext, pause: Callable[[], Awaitable[None]]
) -> bytes:
    """A TLS 1.3 client that stops before the last record of its final flight.

    The server has judged our certificate (Certificate comes first) but cannot
    finish its handshake until the last record arrives; `pause` runs in between.
    Returns what an echo behind the server sends back for b"hello" (b"" if refused).
    """
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_side=False)
    stream = await connect(addr)
    async with stream:
        for _ in range(50):
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                if outgoing.pending:
                    await stream.send_all(outgoing.read())
                incoming.write(await stream.receive_some(65536))
        flight = _tls_records(outgoing.read())
        assert len(flight) >= 2
        await stream.send_all(b"".join(flight[:-1]))
        await pause()
        await stream.send_all(flight[-1])
        tls.write(b"hello")
        try:
            await stream.send_all(outgoing.read())
            for _ in range(50):
                data = await stream.receive_some(65536)
                if not data:
                    return b""
                incoming.write(data)
                try:
                    return tls.read(100)
                except ssl.SSLWantReadError:
                    continue
        except (trio.BrokenResourceError, ssl.SSLError):
            return b""
    raise AssertionError("no answer")


@pytest.mark.parametrize("revoke", [True, False])
async def test_policy_change_during_a_handshake_is_not_missed(
    revoke: bool,
    mesh: Mesh,
    backend: Backend,
    pki: Pki,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """install_policy skips connections still in their handshake: they must be judged again."""
    judged = trio.Event()
    verify = Gate.verify

    def spy(self: Gate, conn: SSL.Connection, cert: Any, err: int, depth: int, ok: int) -> bool:
        result = verify(self, conn, cert, err, depth, ok)
        if depth == 0:
            judged.set()
        return result

    monkeypatch.setattr(Gate, "verify", spy)
    api = await mesh.start("api", forward=backend.addr, allow=[("web", "api")])

    async def pause() -> None:
        await judged.wait()  # the certificate was judged under the old policy...
        if revoke:
            assert api.sidecar.install_policy(Policy.build([], version=2)) == 0

    ctx = client_context(tmp_path, pki.bundle_pem, pki.issue("web"))
    with trio.fail_after(20):
        reply = await _client_with_a_pause(api.inbound, ctx, pause)
        [decision] = await api.log.wait_for("decision")
    if revoke:
        assert reply == b""
        assert (decision["decision"], decision["reason"]) == ("deny", "not_allowed")
        assert backend.accepted == 0
    else:
        assert reply == b"hello"
        assert (decision["decision"], decision["reason"]) == ("allow", "allowed")


async def test_a_serial_revoked_by_the_feed_cuts_exactly_that_svids_connections(
    mesh: Mesh, backend: Backend
) -> None:
    """Revocation by serial: web's live connection is cut, db's (same policy) lives on."""
    both = [("web", "api"), ("db", "api")]
    api = await mesh.start("api", forward=backend.addr, allow=both)
    web = await mesh.start("web", outbound=[("api", api.inbound)], allow=both)
    db = await mesh.start("db", outbound=[("api", api.inbound)], allow=both)
    web_svid = web.sidecar.current_svid()
    assert web_svid is not None
    with trio.fail_after(20):
        from_web = await connect(web.outbound())
        from_db = await connect(db.outbound())
        async with from_web, from_db:
            await _echo(from_web, b"web")
            await _echo(from_db, b"db")
            current = api.sidecar.current_policy()
            closed = api.sidecar.install_policy(
                Policy.build(
                    current.pairs,
                    version=current.version,
                    revocation_version=1,
                    revoked_serials=[web_svid.serial],
                )
            )
            assert await wait_cut(from_web) == b""
            [cut] = await api.log.wait_for("close")
            await _echo(from_db, b"db still talks")
    assert closed == 1
    assert cut["reason"] == "identity_revoked" and cut["peer_id"] == WEB


@pytest.mark.parametrize("chunk", [None, 1], ids=["at-once", "by-the-duty-in-chunks"])
async def test_a_change_cuts_exactly_the_denied_peers_among_hundreds_of_live_connections(
    mesh: Mesh, backend: Backend, chunk: int | None
) -> None:
    """Three peers, 60 live connections each: denying one cuts its 60, the 120 others talk on.

    With chunks of one peer, the change (which adds a prefix rule, so every peer is
    judged) is left to the re-judge duty, which judges a peer between checkpoints.
    """
    names = ("web", "db", "cache")
    allow = [(name, "api") for name in names]
    api = await mesh.start("api", forward=backend.addr, allow=allow)
    if chunk is not None:
        api.sidecar.rejudge_chunk = chunk
    clients = [
        await mesh.start(name, outbound=[("api", api.inbound)], allow=allow) for name in names
    ]
    per_peer = 60
    with trio.fail_after(30):
        streams: dict[str, list[trio.SocketStream]] = {name: [] for name in names}
        for name, client in zip(names, clients, strict=True):
            for i in range(per_peer):
                stream = await connect(client.outbound())
                streams[name].append(stream)
                await _echo(stream, f"{name}{i}".encode())
        kept = [(SpiffeId.parse(sid(n)), SpiffeId.parse(API)) for n in names if n != "db"]
        unrelated = [("spiffe://example.org/elsewhere/*", API)]
        closed = api.sidecar.install_policy(Policy.build(kept, 9, prefix_rules=unrelated))
        [done] = await api.log.wait_for("policy", version=9)
        assert done["closed_connections"] == per_peer
        assert closed == (per_peer if chunk is None else 0)
        if chunk is not None:
            assert done["rejudged_groups"] == 3
        for stream in streams["db"]:
            assert await wait_cut(stream) == b""
        for name in ("web", "cache"):
            for i, stream in enumerate(streams[name]):
                await _echo(stream, f"{name} still {i}".encode())
        cuts = await api.log.wait_for("close", reason="policy_revoked", count=per_peer)
        for stream in (s for group in streams.values() for s in group):
            await stream.aclose()
    assert {c["peer_id"] for c in cuts} == {DB}
    assert len(api.log.find("close", reason="policy_revoked")) == per_peer
    assert metric(api.sidecar, "meshid_connections_closed_total", reason="policy_revoked") == 60
