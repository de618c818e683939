"""The highly available authority, whole: two `meshid ca serve` instances of one trust
domain over one PostgreSQL database, and sidecars that name them.

Each instance is a state directory of its own (`one` made by `ca init --database`,
`two` by `ca join`) with a signing root of its own; they meet only through the
database (tests/ca/pg_cluster.py starts a throwaway server per test worker).
What is checked is what an operator relies on:

- a change made on one instance reaches the sidecars attached to the other,
  and cuts their live connections, within 2 s;
- a sidecar that names both instances rides out one of them dying (SIGKILL,
  under traffic) without a failed request, and renews through the other;
- the database going away costs requests a 503 with Retry-After and a logged
  reason, never the sidecars' current SVIDs, and the instance recovers alone.
"""

from __future__ import annotations

import pytest
import trio
from harness import Addr, LiveConnection, Mesh, Probe, sid

DEADLINE = 2.0  # seconds from the command's exit, as for one instance


@pytest.mark.slow
async def test_a_deny_on_one_instance_cuts_connections_of_sidecars_on_the_other(
    mesh: Mesh, app: Addr, pg_url: str
) -> None:
    """Slow (about 15 s): two instances and two sidecars, each sidecar attached to one.

    The probe (a client with an SVID of its own, no sidecar) talks straight to
    api's inbound, so only api's sidecar, which hears instance two alone, can
    cut its connection when the deny is made through instance one.
    """
    with trio.fail_after(100):
        one, two = await mesh.start_instances(pg_url)
        await two.allow("web", "api")  # made on two, obeyed by web, which hears one
        await two.allow("probe", "api")
        api = await mesh.sidecar("api", forward=app, servers=[two])
        web = await mesh.sidecar("web", outbound=[("api", api.inbound)], servers=[one])
        probe = Probe("probe", mesh.root / "probe", two)
        await probe.issue()
        await web.log.wait_for("policy", where=lambda r: r["pairs"] == 1)  # its own pairs
        await api.log.wait_for("policy", where=lambda r: r["pairs"] == 2)

        web_live = await LiveConnection.open(web.outbound())
        probe_live = await probe.open_live(api.inbound, "api")

        # deny probe -> api through one: api, on two, cuts the probe's connection
        api_mark = api.log.mark()
        denied = await one.deny("probe", "api")
        cut_at = await probe_live.wait_cut(within=10)
        assert cut_at - denied.exited_at < DEADLINE
        [heard] = await api.log.wait_for("policy", since=api_mark)
        assert heard["closed_connections"] == 1
        [close] = await api.log.wait_for("close", since=api_mark, peer_id=sid("probe"))
        assert close["reason"] == "policy_revoked"
        assert await web_live.still_works(b"the other pair is untouched")

        # deny web -> api through one: the live connection between the two sidecars is cut,
        # and api, on two, has heard the deny within the same 2 s
        api_mark = api.log.mark()
        denied = await one.deny("web", "api")
        cut_at = await web_live.wait_cut(within=10)
        assert cut_at - denied.exited_at < DEADLINE
        [heard] = await api.log.wait_for("policy", since=api_mark, within=DEADLINE + 1)
        assert heard["_seen"] - denied.exited_at < DEADLINE
        assert heard["pairs"] == 0

        # the instances are two: each sidecar only ever spoke to its own
        assert web.log.find("authority_failover") == api.log.find("authority_failover") == []
