"""Allow-list and revocation changes made with the CLI reach running sidecars within 2 s.

The clock starts when the `meshid policy …` / `meshid ca revoke` process has
exited and stops when a new connection first behaves by the new rule, seen
from outside: through web's outbound (web enforces as a client) and from a
probe client with its own SVID straight to api's inbound (api enforces as a
server). `meshid policy check` answers from the same live state.
"""

from __future__ import annotations

import pytest
import trio
from harness import Addr, Mesh, Probe, request_ok, sid, wait_until

DEADLINE = 2.0  # the promise: "within seconds"; measured from the command's exit


@pytest.mark.slow
async def test_policy_changes_and_revocation_reach_sidecars_within_2s(
    mesh: Mesh, app: Addr
) -> None:
    """Slow (about 5 s): a mesh of processes, and a series of changes each timed from outside."""
    with trio.fail_after(100):
        ca = await mesh.start_authority()
        api = await mesh.sidecar("api", forward=app)
        web = await mesh.sidecar("web", outbound=[("api", api.inbound)])
        probe = Probe("probe", mesh.root / "probe", ca)
        await probe.issue()

        async def web_gets_through() -> bool:
            return await request_ok(web.outbound())

        async def web_refused() -> bool:
            return not await request_ok(web.outbound())

        async def probe_gets_through() -> bool:
            return await probe.roundtrip_ok(api.inbound, "api")

        async def probe_refused() -> bool:
            return not await probe.roundtrip_ok(api.inbound, "api")

        # Default deny, both ways, and `policy check` says so.
        assert await web_refused()
        assert await probe_refused()
        [refused] = await web.log.wait_for("decision", decision="deny", direction="outbound")
        assert (refused["reason"], refused["peer_id"]) == ("not_allowed", sid("api"))
        [api_refused] = await api.log.wait_for("decision", decision="deny", direction="inbound")
        assert (api_refused["reason"], api_refused["peer_id"]) == ("not_allowed", sid("probe"))
        check = await ca.check("web", "api")
        assert check.returncode == 1, check
        assert check.stdout == (
            f"denied: no rule allows {sid('web')} -> {sid('api')} "
            "(policy version 0, default deny)\n"
        )

        # allow: new connections get through, on both sidecars' say-so.
        allowed = await ca.allow("web", "api")
        assert (
            await wait_until(web_gets_through, what="web -> api allowed") - allowed.exited_at
            < DEADLINE
        )
        allowed = await ca.allow("probe", "api")
        assert (
            await wait_until(probe_gets_through, what="probe -> api allowed") - allowed.exited_at
            < DEADLINE
        )
        check = await ca.check("web", "api")
        assert check.returncode == 0, check
        assert check.stdout == (
            f"allowed: allowed by rule {sid('web')} -> {sid('api')} (policy version 2)\n"
        )
        assert (await ca.check("probe", "api")).returncode == 0
        assert (await ca.check("api", "web")).returncode == 1  # a pair has a direction

        # deny: refused again; api refuses the probe itself (inbound enforcement).
        mark = api.log.mark()
        denied = await ca.deny("probe", "api")
        assert (
            await wait_until(probe_refused, what="probe -> api denied") - denied.exited_at
            < DEADLINE
        )
        assert await probe_refused()  # a connection made after the change, not one it cut
        [deny, *_] = await api.log.wait_for("decision", decision="deny", since=mark)
        assert (deny["reason"], deny["peer_id"]) == ("not_allowed", sid("probe"))
        check = await ca.check("probe", "api")
        assert check.returncode == 1
        assert (
            check.stdout.startswith("denied: no rule allows") and "policy version 3" in check.stdout
        )
        assert await web_gets_through()  # the other pair is untouched

        mark = web.log.mark()
        denied = await ca.deny("web", "api")
        assert await wait_until(web_refused, what="web -> api denied") - denied.exited_at < DEADLINE
        assert await web_refused()
        [deny, *_] = await web.log.wait_for("decision", decision="deny", since=mark)
        assert (deny["direction"], deny["reason"]) == ("outbound", "not_allowed")

        # revoke: even an allowed pair is refused once one side is revoked.
        allowed = await ca.allow("web", "api")
        assert (
            await wait_until(web_gets_through, what="web -> api allowed again") - allowed.exited_at
            < DEADLINE
        )
        web_mark, api_mark = web.log.mark(), api.log.mark()
        revoked = await ca.revoke("web")
        assert (
            await wait_until(web_refused, what="revoked web refused") - revoked.exited_at < DEADLINE
        )
        # The control plane refuses web's own feed, and web stops using its identity, loudly;
        # until it has heard, api refuses it (either side's refusal is a refusal).
        await web.log.wait_for("watch_failed", since=web_mark, reason="identity_revoked")
        await web.log.wait_for("identity_revoked", since=web_mark)
        assert await web_refused()
        denials = [
            (e["direction"], e["reason"])
            for e in [
                *web.log.find("decision", since=web_mark),
                *api.log.find("decision", since=api_mark),
            ]
            if e["decision"] == "deny"
        ]
        assert ("outbound", "identity_revoked") in denials
        assert {reason for _, reason in denials} == {"identity_revoked"}
        # web's own refusals cite the revocation it never got a feed for, as api's do
        own = [e for e in web.log.find("decision", since=web_mark) if e["decision"] == "deny"]
        assert own and all("(revocation version 1, " in e["detail"] for e in own), own
        check = await ca.check("web", "api")
        assert check.returncode == 1
        assert check.stdout.startswith(f"denied: {sid('web')} is revoked (revocation version 1, ")
        assert len(check.stdout.splitlines()) == 1


@pytest.mark.parametrize("args", [("nobody", "api"), ("web", "spiffe://other.org/api")])
async def test_policy_check_of_unknown_or_foreign_ids(mesh: Mesh, args: tuple[str, str]) -> None:
    """An ID never mentioned is simply denied; one of another trust domain is bad input."""
    with trio.fail_after(30):
        await mesh.authority.init()
        result = await mesh.authority.check(*args)
    if args[0] == "nobody":
        assert result.returncode == 1
        assert result.stdout.startswith("denied: no rule allows")
    else:
        assert result.returncode == 1
        assert result.stdout == ""
        assert result.stderr.startswith("Error: ") and len(result.stderr.splitlines()) == 1
