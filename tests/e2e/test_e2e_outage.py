"""A control-plane outage shorter than the SVID lifetime costs no traffic.

SVIDs of 60 s are renewed at about 30 s, so stopping `meshid ca serve` right
after enrollment makes the first renewal fail while half the lifetime is
still left. Traffic must flow all along, the failures must be logged and
counted, a sidecar restarted meanwhile must come back on its persisted SVID
(and its persisted allow-list), and renewals must resume once the control
plane is back on the same address.
"""

from __future__ import annotations

import pytest
import trio
from harness import Addr, Mesh, Traffic, request_ok, sid


@pytest.mark.slow  # about 45 s: the first renewal of a 60 s SVID is due at about 30 s
@pytest.mark.timeout(150)
async def test_sidecars_ride_out_a_control_plane_outage(mesh: Mesh, app: Addr) -> None:
    with trio.fail_after(140):
        ca = await mesh.start_authority(svid_ttl="60s")
        await ca.allow("web", "api")
        limits = {"drain_timeout": "2s"}
        api = await mesh.sidecar("api", forward=app, limits=limits)
        web = await mesh.sidecar("web", outbound=[("api", api.inbound)], limits=limits)
        assert await request_ok(web.outbound())

        # The control plane goes away; traffic does not notice.
        during = Traffic(target=web.outbound)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(during.run, 100.0)
            assert await ca.stop() == 0
            for car in (api, web):
                await car.log.wait_for("renewal_failed", within=60)
            during.stop.set()
        assert during.failures == []
        assert during.ok >= 100 and during.live_exchanges >= 20
        for car in (api, web):
            failed = car.log.find("renewal_failed")
            assert failed[0]["reason"] == "authority_unreachable"
            assert failed[0]["seconds_left"] > 15  # renewing early left room for the outage
            assert failed[0]["svid_state"] == "ok"
            assert car.log.find("watch_failed")
            assert not car.log.find("svid_expired")
            assert await car.metric("meshid_svid_renewals_total", result="error") >= 1

        # A sidecar restarted during the outage serves with what it persisted.
        before = web.serials()[-1]
        mark = web.log.mark()
        assert await web.stop() == 0
        await web.start()
        [restored] = web.log.find("credentials", since=mark, how="restored")
        assert restored["serial"] == before
        assert not web.log.find("credentials", since=mark, how="enrolled")
        # the allow-list came back from disk too: web's outbound still lets web -> api through
        [policy, *_] = web.log.find("policy", since=mark)
        assert policy["pairs"] == 1

        # The control plane comes back on the same address; renewals resume.
        after = Traffic(target=web.outbound)
        marks = {car.name: car.log.mark() for car in (api, web)}
        async with trio.open_nursery() as nursery:
            nursery.start_soon(after.run, 100.0)
            await ca.serve()
            for car in (api, web):
                [renewed, *_] = await car.log.wait_for(
                    "credentials", since=marks[car.name], how="renewed", within=40
                )
                assert renewed["serial"] not in car.serials("enrolled", "restored")
            # a connection made now carries web's renewed SVID to api
            api_mark = api.log.mark()
            assert await request_ok(web.outbound())
            await api.log.wait_for(
                "decision",
                since=api_mark,
                decision="allow",
                peer_id=sid("web"),
                peer_serial=web.serials()[-1],
            )
            after.stop.set()
        assert after.failures == []
        assert after.ok >= 1  # the control plane may be back and renewing within a second
        for car in (api, web):
            assert await car.metric("meshid_svid_renewals_total", result="ok") >= 1
            assert not car.log.find("svid_expired")
