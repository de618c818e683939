"""Live connections are re-checked while they live: deny, revoke and peer-certificate expiry.

Topology: app -> web's outbound -> api's inbound -> echo app, plus a probe
client holding its own SVID (from `meshid ca issue`) straight to api's
inbound. A change must cut exactly the connections it concerns, within 2 s
of the command's exit, while another allowed pair through the same sidecar
keeps talking.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
import trio
from harness import (
    Addr,
    LiveConnection,
    Mesh,
    Probe,
    request_ok,
    sid,
    utcnow,
    wait_until,
)

DEADLINE = 2.0


@pytest.mark.slow
async def test_deny_and_revoke_cut_exactly_their_live_connections(mesh: Mesh, app: Addr) -> None:
    """Slow (about 12 s): a whole mesh of processes, a deny, a re-allow and a revocation,
    each waited on through the sidecars' logs."""
    with trio.fail_after(100):
        ca = await mesh.start_authority()
        await ca.allow("web", "api")
        await ca.allow("probe", "api")
        api = await mesh.sidecar("api", forward=app)
        web = await mesh.sidecar("web", outbound=[("api", api.inbound)])
        probe = Probe("probe", mesh.root / "probe", ca)
        await probe.issue()

        web_live = await LiveConnection.open(web.outbound())
        probe_live = await probe.open_live(api.inbound, "api")

        # deny web -> api: web's live connection is cut on both sidecars, the probe's is not.
        web_mark, api_mark = web.log.mark(), api.log.mark()
        denied = await ca.deny("web", "api")
        cut_at = await web_live.wait_cut(within=10)
        assert cut_at - denied.exited_at < DEADLINE
        assert await probe_live.still_works(b"after deny")
        [api_close] = await api.log.wait_for("close", since=api_mark, peer_id=sid("web"))
        [web_close] = await web.log.wait_for("close", since=web_mark, peer_id=sid("api"))
        # Both sidecars enforce; whichever cuts first, the other may see the reset (or a
        # TLS stream ended without close_notify) first.
        reasons = {api_close["reason"], web_close["reason"]}
        assert "policy_revoked" in reasons, reasons
        assert reasons <= {"policy_revoked", "peer_reset", "peer_truncated", "closed"}, reasons
        [policy] = await api.log.wait_for("policy", since=api_mark)
        assert policy["closed_connections"] in (0, 1)  # 0 if web's cut arrived first
        assert not api.log.find("close", since=api_mark, peer_id=sid("probe"))
        assert not await request_ok(web.outbound())  # and no new one

        # revoke probe: its live connection is cut (identity_revoked), a new one refused,
        # and web's new live connection through the same api sidecar carries on.
        await ca.allow("web", "api")
        await wait_until(lambda: request_ok(web.outbound()), what="web -> api allowed again")
        web_live2 = await LiveConnection.open(web.outbound())
        api_mark = api.log.mark()
        revoked = await ca.revoke("probe")
        cut_at = await probe_live.wait_cut(within=10)
        assert cut_at - revoked.exited_at < DEADLINE
        [close] = await api.log.wait_for("close", since=api_mark, peer_id=sid("probe"))
        assert close["reason"] == "identity_revoked"
        assert close["bytes_in"] > 0 and close["bytes_out"] > 0
        assert await web_live2.still_works(b"after revoke")
        assert not await probe.roundtrip_ok(api.inbound, "api")
        [refused] = await api.log.wait_for("decision", decision="deny", since=api_mark)
        assert (refused["reason"], refused["peer_id"]) == ("identity_revoked", sid("probe"))
        assert not api.log.find("close", since=api_mark, peer_id=sid("web"))
        await web_live2.aclose()
        await web_live.aclose()


@pytest.mark.slow
async def test_connection_closed_when_peer_certificate_expires(mesh: Mesh, app: Addr) -> None:
    """SVIDs of 30 s: a connection lives no longer than the certificate it was authenticated
    with (close_on_peer_expiry, on by default); a new one with the renewed SVID works.

    Slow (about 32 s): real processes on the real clock wait for a real expiry. The same
    rule runs in-process, with a 3 s certificate, in tests/sidecar/test_sidecar_peers.py."""
    with trio.fail_after(100):
        ca = await mesh.start_authority(svid_ttl="30s")
        await ca.allow("web", "api")
        await ca.allow("probe", "api")
        api = await mesh.sidecar("api", forward=app)
        web = await mesh.sidecar("web", outbound=[("api", api.inbound)])
        probe = Probe("probe", mesh.root / "probe", ca)
        await probe.issue(ttl="30s")
        probe_expires = probe.leaf().not_valid_after_utc

        # One connection between two sidecars, one from the probe, both made now.
        web_live = await LiveConnection.open(web.outbound())
        probe_live = await probe.open_live(api.inbound, "api")
        [first] = api.log.find("decision", decision="allow", peer_id=sid("web"))
        [web_enrolled] = web.log.find("credentials", how="enrolled")
        [api_enrolled] = api.log.find("credentials", how="enrolled")
        assert first["peer_serial"] == web_enrolled["serial"]

        async with trio.open_nursery() as nursery:
            nursery.start_soon(web_live.wait_cut, 50)
            nursery.start_soon(probe_live.wait_cut, 50)

        # The probe's certificate: api cut the connection when it expired (sweep: 1 s).
        assert probe_live.cut_wall is not None
        late = (probe_live.cut_wall - probe_expires).total_seconds()
        assert -0.5 < late < 2.5, late
        [close] = await api.log.wait_for("close", peer_id=sid("probe"), within=5)
        assert close["reason"] == "peer_certificate_expired"

        # Between the sidecars, the first of the two enrolled SVIDs to expire ends it.
        expiry = min(
            datetime.fromisoformat(web_enrolled["not_after"]),
            datetime.fromisoformat(api_enrolled["not_after"]),
        )
        assert web_live.cut_wall is not None
        late = (web_live.cut_wall - expiry).total_seconds()
        assert -0.5 < late < 2.5, late

        async def closed_for_expiry() -> bool:
            closes = [
                *api.log.find("close", peer_id=sid("web"), conn_id=first["conn_id"]),
                *web.log.find("close", peer_id=sid("api")),
            ]
            return "peer_certificate_expired" in {c["reason"] for c in closes}

        await wait_until(closed_for_expiry, within=5, what="a close for peer_certificate_expired")
        assert web_live.exchanges >= 1

        # Both sidecars renewed meanwhile; new connections carry the renewed SVIDs.
        assert web.serials("renewed") and api.serials("renewed")
        mark = api.log.mark()
        assert await request_ok(web.outbound(), b"renewed")
        [again] = await api.log.wait_for("decision", since=mark, decision="allow")
        assert again["peer_serial"] in web.serials("renewed")
        assert again["peer_serial"] != web_enrolled["serial"]

        # The probe renews the way a workload without a sidecar would: a new SVID.
        await probe.issue(ttl="30s")
        assert probe.leaf().not_valid_after_utc - probe_expires > timedelta(seconds=1)
        assert await probe.roundtrip_ok(api.inbound, "api")
        # The negative twin: the expired SVID itself is refused at the handshake.
        stale = Probe("probe", probe.dir, ca, svid_dir=probe.dir / "svid-1")
        assert stale.leaf().not_valid_after_utc < utcnow()
        mark = api.log.mark()
        assert not await stale.roundtrip_ok(api.inbound, "api")
        [refused] = await api.log.wait_for("decision", since=mark, decision="deny")
        assert "expired" in refused["reason"], refused
