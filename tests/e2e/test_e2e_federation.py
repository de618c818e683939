"""Two trust domains, federated both ways through their bundle endpoints, as real processes.

example.org's authority and sidecar `api`, b.example's authority and sidecar
`web`. A cross-domain call works only once the pair is allowed on both
sides; before that each refusal is logged with its reason. A root rollover
in b.example then reaches example.org's sidecar through the bundle endpoint
and `meshid federation refresh`, with the live connection kept.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from harness import Addr, Mesh, Processes, meshid, receive_exactly, request_ok, wait_until

A, B = "example.org", "b.example"


@pytest.fixture
async def meshes(tmp_path: Path) -> AsyncIterator[tuple[Mesh, Mesh]]:
    procs = Processes()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    try:
        yield Mesh(tmp_path / "a", procs, A), Mesh(tmp_path / "b", procs, B)
    finally:
        await procs.stop_all()


async def federate(own: Mesh, other: Mesh) -> None:
    """`meshid federation add` on own's state, bootstrapped with other's bundle file."""
    assert other.authority.bundle_url is not None
    bootstrap = own.root / f"{other.td}.bundle.pem"
    bootstrap.write_bytes(other.authority.bundle_pem())
    (
        await meshid(
            "federation",
            "add",
            other.td,
            "--url",
            other.authority.bundle_url,
            "--endpoint-id",
            f"spiffe://{other.td}/meshid/authority",
            "--bundle",
            bootstrap,
            "--state",
            own.authority.state,
        )
    ).check()


@pytest.mark.slow
async def test_a_cross_domain_call_needs_the_pair_on_both_sides(
    meshes: tuple[Mesh, Mesh], app: Addr
) -> None:
    """Slow (about 10 s): two authorities and two sidecars as processes."""
    a, b = meshes
    a.authority.bundle_endpoint = b.authority.bundle_endpoint = True
    with trio.fail_after(120):
        ca_a = await a.start_authority()
        ca_b = await b.start_authority()
        await federate(a, b)
        await federate(b, a)
        api = await a.sidecar("api", forward=app)
        web = await b.sidecar("web", outbound=[(f"spiffe://{A}/api", api.inbound)])
        for car in (api, web):  # the federated bundle arrived with the feed
            await car.log.wait_for("credentials", how="bundle_updated", within=20)

        async def gets_through() -> bool:
            return await request_ok(web.outbound())

        # Nothing allowed: web's own sidecar refuses, with its reason.
        assert not await gets_through()
        [refused] = await web.log.wait_for("decision", decision="deny", direction="outbound")
        assert (refused["reason"], refused["peer_id"]) == ("not_allowed", f"spiffe://{A}/api")

        # Allowed in b.example only: example.org's api refuses the inbound call.
        (await meshid("policy", "allow", "web", f"spiffe://{A}/api", "--state", ca_b.state)).check()

        async def api_refuses_inbound() -> bool:
            through = await gets_through()
            assert not through, "allowed on one side only, yet the call went through"
            return bool(api.log.find("decision", decision="deny", direction="inbound"))

        await wait_until(api_refuses_inbound, within=20, what="api refuses web inbound")
        [inbound] = api.log.find("decision", decision="deny", direction="inbound")
        assert inbound["reason"] == "not_allowed", inbound
        assert inbound["peer_id"] == f"spiffe://{B}/web"

        # Allowed on both sides: the call goes through.
        (await meshid("policy", "allow", f"spiffe://{B}/web", "api", "--state", ca_a.state)).check()
        await wait_until(gets_through, within=20, what="cross-domain call allowed")
        [allowed] = await api.log.wait_for("decision", decision="allow", direction="inbound")
        assert allowed["peer_id"] == f"spiffe://{B}/web"

        # A pair naming a trust domain that is not federated is refused, by name.
        stray = await meshid(
            "policy", "allow", "spiffe://c.example/x", "api", "--state", ca_a.state
        )
        assert stray.returncode != 0
        assert "c.example is not federated" in stray.stderr + stray.stdout

        # A root rollover in b.example reaches example.org's api through b.example's
        # bundle endpoint; a connection open across it is not broken.
        held = await trio.open_tcp_stream(*web.outbound())
        await held.send_all(b"before")
        assert await receive_exactly(held, 6) == b"before"
        mark = api.log.mark()
        await ca_b.rotate("1h")  # the next root is published in b.example's bundle
        refreshed = await meshid("federation", "refresh", B, "--state", ca_a.state)
        assert "bundle sequence" in refreshed.check().stdout
        await api.log.wait_for("credentials", how="bundle_updated", since=mark, within=20)
        await held.send_all(b"after")
        assert await receive_exactly(held, 5) == b"after"
        await held.aclose()
        assert await gets_through()

        # `federation list --json` shows the other domain's bundle, fresh.
        listed = await meshid("federation", "list", "--json", "--state", ca_a.state)
        [row] = json.loads(listed.check().stdout)
        assert (row["trust_domain"], row["stale"], row["roots"]) == (B, False, 2)
