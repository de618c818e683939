"""The allowed pair and its negative twins: bytes flow only between pairs on the allow-list.

Default deny holds in both directions' sense: the inbound sidecar of TO
refuses FROM, and the outbound sidecar of FROM refuses to reach a TO it is not
allowed to, even when that TO has a perfectly valid certificate.
"""

from __future__ import annotations

import trio
from sidecar_helpers import API, WEB, Backend, connect, metric, roundtrip, sid, wait_cut
from sidecar_mesh import Mesh, Pair, start_pair

from meshid import report


async def test_allowed_pair_passes_bytes_both_ways(pair: Pair) -> None:
    with trio.fail_after(20):
        assert await roundtrip(pair.app, b"hello api") == b"hello api"
        # A second connection resumes the TLS session; it is judged all the same.
        assert await roundtrip(pair.app, b"again") == b"again"
        api_closes = await pair.api.log.wait_for("close", direction="inbound", count=2)
        web_closes = await pair.web.log.wait_for("close", direction="outbound", count=2)

    assert pair.backend.accepted == 2
    allowed_in = pair.api.log.find("decision", decision="allow", reason="allowed")
    allowed_out = pair.web.log.find("decision", decision="allow", reason="allowed")
    assert [r["peer_id"] for r in allowed_in] == [WEB, WEB]
    assert [r["peer_id"] for r in allowed_out] == [API, API]
    assert all(r["local_id"] == API and r["direction"] == "inbound" for r in allowed_in)
    assert all(r["upstream"] == "{}:{}".format(*pair.api.inbound) for r in allowed_out)
    assert [(r["bytes_in"], r["bytes_out"], r["reason"]) for r in api_closes] == [
        (9, 9, "closed"),
        (5, 5, "closed"),
    ]
    assert [(r["bytes_in"], r["bytes_out"]) for r in web_closes] == [(9, 9), (5, 5)]
    assert not pair.api.log.find("decision", decision="deny")
    assert not pair.web.log.find("decision", decision="deny")
    # What the spec promises on every decision and close line.
    common = {"time", "direction", "peer_id", "local_id", "peer_addr", "reason"}
    for record in allowed_in + allowed_out:
        assert common | {"decision"} <= record.keys()
    for record in api_closes + web_closes:
        assert common | {"bytes_in", "bytes_out", "duration_ms"} <= record.keys()

    api, web = pair.api.sidecar, pair.web.sidecar
    assert metric(api, "meshid_connections_total", direction="inbound", decision="allow") == 2
    assert metric(web, "meshid_connections_total", direction="outbound", reason="allowed") == 2
    assert metric(api, "meshid_bytes_total", direction="inbound", flow="in") == 14
    assert metric(web, "meshid_bytes_total", direction="outbound", flow="out") == 14
    assert metric(api, "meshid_live_connections", direction="inbound") == 0
    assert metric(api, "meshid_connections_closed_total", reason="closed") == 2


async def test_pair_missing_from_inbound_allow_list_is_refused(
    mesh: Mesh, backend: Backend
) -> None:
    # web believes it may call api; api's allow-list says otherwise.
    pair = await start_pair(mesh, backend, api_allows=[("db", "api")])
    with trio.fail_after(20):
        stream = await connect(pair.app)
        async with stream:
            await stream.send_all(b"hello?")
            assert await wait_cut(stream) == b""
        [deny] = await pair.api.log.wait_for("decision", decision="deny")
    assert deny["reason"] == "not_allowed"
    assert deny["direction"] == "inbound"
    assert deny["peer_id"] == WEB
    assert backend.accepted == 0
    assert not pair.api.log.find("decision", decision="allow")
    api = pair.api.sidecar
    assert metric(api, "meshid_connections_total", decision="deny", reason="not_allowed") == 1
    assert metric(api, "meshid_handshake_failures_total", reason="not_allowed") == 1
    # the status report carries the last hour's refusals, per peer and reason
    [refused] = api.status_report("api-0").refusals
    assert (refused.direction, str(refused.peer_id), refused.kind) == ("inbound", WEB, "deny")
    assert (refused.reason, refused.count) == ("not_allowed", 1)


async def test_pair_missing_from_outbound_allow_list_is_never_dialled(
    mesh: Mesh, backend: Backend
) -> None:
    # api would accept web, and has a valid certificate; web may not reach api.
    pair = await start_pair(mesh, backend, web_allows=[("web", "db")])
    with trio.fail_after(20):
        stream = await connect(pair.app)
        async with stream:
            await stream.send_all(b"hello?")
            assert await wait_cut(stream) == b""
        [deny] = await pair.web.log.wait_for("decision", decision="deny")
    assert deny["reason"] == "not_allowed"
    assert deny["direction"] == "outbound"
    assert deny["peer_id"] == API
    # Refused before any packet left: api never saw a connection, the app never a byte.
    assert pair.api.log.find("decision") == []
    assert backend.accepted == 0
    web = pair.web.sidecar
    assert metric(web, "meshid_connections_total", decision="deny", reason="not_allowed") == 1
    assert metric(web, "meshid_handshake_failures_total", reason="not_allowed") == 0
    [refused] = web.status_report("web-0").refusals
    assert (refused.direction, str(refused.peer_id), refused.kind) == ("outbound", API, "deny")


async def test_upstream_presenting_the_wrong_id_is_refused(mesh: Mesh, backend: Backend) -> None:
    # db has a valid SVID and would accept web, but web's route expects api.
    db = await mesh.start("db", forward=backend.addr, allow=[("web", "db"), ("web", "api")])
    web = await mesh.start(
        "web", outbound=[("api", db.inbound)], allow=[("web", "api"), ("web", "db")]
    )
    with trio.fail_after(20):
        stream = await connect(web.outbound())
        async with stream:
            await stream.send_all(b"for api only")
            assert await wait_cut(stream) == b""
        [deny] = await web.log.wait_for("decision", decision="deny")
    assert deny["reason"] == "wrong_identity"
    assert deny["peer_id"] == sid("db")
    assert API in deny["detail"]
    assert backend.accepted == 0
    assert not web.log.find("decision", decision="allow")
    assert metric(web.sidecar, "meshid_handshake_failures_total", reason="wrong_identity") == 1


async def test_allowed_pair_over_ipv6_loopback(mesh: Mesh, backend: Backend) -> None:
    api = await mesh.start("api", forward=backend.addr, allow=[("web", "api")], host="::1")
    web = await mesh.start(
        "web", outbound=[("api", api.inbound)], allow=[("web", "api")], host="::1"
    )
    assert api.inbound[0] == web.outbound()[0] == "::1"
    with trio.fail_after(20):
        assert await roundtrip(web.outbound(), b"over v6") == b"over v6"
        [allow] = await api.log.wait_for("decision", decision="allow")
        [close] = await web.log.wait_for("close")
    assert allow["peer_id"] == WEB
    assert allow["peer_addr"].startswith("[::1]:")
    assert (close["reason"], close["bytes_in"], close["bytes_out"]) == ("closed", 7, 7)


async def test_a_busy_sidecars_report_stays_within_the_authoritys_limits(pair: Pair) -> None:
    """More live connections than a report lists: a sample, a count of the rest, never refused."""
    extra = report.MAX_CONNECTIONS + 4
    with trio.fail_after(20):
        streams = [await connect(pair.app) for _ in range(extra)]
        for stream in streams:
            await stream.send_all(b"x")
            assert await stream.receive_some(1) == b"x"
        await pair.api.log.wait_for("decision", decision="allow", count=extra)
        raw = pair.api.sidecar.status_report("api-0")
        parsed = report.decode_report(raw.encode().encode())
        for stream in streams:
            await stream.aclose()
    assert len(raw.connections) == report.MAX_CONNECTIONS  # the sidecar samples, itself
    assert len(parsed.connections) == report.MAX_CONNECTIONS
    assert parsed.connections_omitted == extra - report.MAX_CONNECTIONS
    assert [(p.direction, str(p.peer_id), p.count) for p in parsed.pairs] == [
        ("inbound", WEB, extra)
    ]
