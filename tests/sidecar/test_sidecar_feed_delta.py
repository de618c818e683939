"""A dynamic sidecar follows the allow-list by deltas, and by whole lists when it must.

A real control plane and a real sidecar in this process, over TLS on
127.0.0.1. The sidecar's requests to the authority go through unchanged; the
test only records what came back, to see whether it was a delta or a whole
list and how large. In every case the sidecar ends up enforcing exactly the
allow-list the authority would send it whole.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
import trio
from sidecar_helpers import TD, Backend, LogCapture, fmt, utcnow

import ca.policyhistory
from ca.authority import Authority
from ca.server import ControlPlane, ServerOptions
from meshid.clock import ManualClock, system_clock
from meshid.events import EventLog
from meshid.feedwire import Feed
from meshid.spiffeid import SpiffeId
from sidecar.app import Sidecar
from sidecar.config import parse_config
from sidecar.dynamic import DynamicIdentity

WEB = SpiffeId(TD, "/web")
API = SpiffeId(TD, "/api")


@dataclass
class Feeds:
    """The feeds the sidecar was answered with, with the query each answered."""

    seen: list[tuple[dict[str, str], dict[str, Any]]] = field(default_factory=list)
    # Set: the next delta is made to claim this base version, as a confused authority might.
    spoil_base: int | None = None

    def answering(self, policy_version: int) -> list[dict[str, Any]]:
        return [
            doc for query, doc in self.seen if query.get("policy_version") == str(policy_version)
        ]


@dataclass
class World:
    authority: Authority
    sidecar: Sidecar
    log: LogCapture
    feeds: Feeds

    @property
    def dynamic(self) -> DynamicIdentity:
        assert self.sidecar.dynamic is not None
        return self.sidecar.dynamic

    def whole(self) -> Feed:
        return Feed.parse(self.authority.feed(WEB))

    def enforces_what_the_authority_says(self) -> None:
        whole, policy = self.whole(), self.sidecar.current_policy()
        assert policy.version == whole.policy_version
        assert policy.pairs == frozenset(whole.pairs)
        assert policy.prefix_rules == frozenset(whole.prefix_rules)


@pytest.fixture
async def world(
    tmp_path: Path, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[World]:
    auth_dir = tmp_path / "authority"
    Authority.init(auth_dir, TD, clock=ManualClock(utcnow() - timedelta(days=1))).close()
    served = Authority.open(auth_dir, clock=system_clock())
    authority = Authority.open(auth_dir, clock=system_clock())
    for i in range(40):  # a list worth not sending again
        authority.allow(SpiffeId(TD, f"/svc{i}"), WEB)
    config_dir = tmp_path / "web"
    config_dir.mkdir()
    (config_dir / "bundle.pem").write_bytes(authority.bundle().to_pem())
    (config_dir / "token").write_text(authority.create_token(WEB))
    server = ControlPlane(
        served,
        ServerOptions(host="127.0.0.1", port=0, poll_interval=0.05, request_timeout=5.0),
        log=lambda event, **f: None,
        clock=system_clock(),
    )
    feeds = Feeds()
    async with trio.open_nursery() as own:
        _host, port = await own.start(server.serve)
        doc: dict[str, Any] = {
            "identity": "web",
            "trust_domain": TD.name,
            "authority": {
                "server": fmt(("127.0.0.1", port)),
                "bundle": "bundle.pem",
                "token_file": "token",
                "state_dir": str(tmp_path / "state"),
            },
            "inbound": {"listen": "127.0.0.1:0", "forward": fmt(backend.addr)},
        }
        log = LogCapture()
        sidecar = Sidecar(parse_config(doc, config_dir), events=EventLog(log))
        with trio.fail_after(20):
            await own.start(sidecar.run)
        assert sidecar.dynamic is not None
        dynamic = sidecar.dynamic
        link = dynamic.link
        ask = link.ask

        async def recording(method: str, asked: Any, *args: Any, **kwargs: Any) -> Any:
            """Each feed of a watch's answer (a stream brings several), with the query as
            the sidecar would have made it then: the policy version it held."""
            each = kwargs.pop("each", None)
            target = asked if isinstance(asked, str) else asked()
            query = dict(parse_qsl(urlsplit(target).query))

            async def take(reply: dict[str, Any]) -> None:
                if "delta" in reply and feeds.spoil_base is not None:
                    delta = {**reply["delta"], "base_version": feeds.spoil_base}
                    reply = {**reply, "delta": delta}
                    feeds.spoil_base = None
                held = {"policy_version": str(dynamic.versions[0])} if "stream" in query else {}
                if urlsplit(target).path == "/v1/watch":
                    feeds.seen.append(({**query, **held}, reply))
                assert each is not None
                await each(reply)

            return await ask(method, asked, *args, **kwargs, each=take if each else None)

        monkeypatch.setattr(link, "ask", recording)
        yield World(authority, sidecar, log, feeds)
        own.cancel_scope.cancel()
    authority.close()
    served.close()


async def _settled(world: World, version: int) -> None:
    """Wait until the sidecar enforces policy `version` (its `policy` line says so)."""
    await world.log.wait_for("policy", version=version)


async def test_one_change_reaches_the_sidecar_as_a_delta_of_one_rule(world: World) -> None:
    with trio.fail_after(20):
        held = world.sidecar.current_policy().version
        await _settled(world, held)
        version = world.authority.allow(WEB, API)
        await _settled(world, version)
    [doc] = world.feeds.answering(held)
    assert doc["pairs"] == [] and doc["prefix_rules"] == []
    assert doc["delta"] == {
        "base_version": held,
        "pairs_added": [[str(WEB), str(API)]],
        "pairs_removed": [],
        "prefix_added": [],
        "prefix_removed": [],
    }
    whole = world.whole().to_json()
    assert len(whole["pairs"]) == 41
    assert len(json.dumps(doc)) < len(json.dumps(whole)) - 40 * len(str(WEB))
    world.enforces_what_the_authority_says()
    # And a removal, the other way round.
    with trio.fail_after(20):
        denied = world.authority.deny(SpiffeId(TD, "/svc3"), WEB)
        await _settled(world, denied)
    [doc] = world.feeds.answering(version)
    assert doc["delta"]["pairs_removed"] == [[str(SpiffeId(TD, "/svc3")), str(WEB)]]
    world.enforces_what_the_authority_says()
    await world.dynamic.state.wait_saved()  # what is saved is the whole feed
    saved = Feed.parse(json.loads((world.dynamic.state.path / "feed.json").read_text()))
    assert saved == world.whole()


async def test_a_sidecar_behind_the_history_gets_the_whole_list(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ca.policyhistory, "HISTORY_ROWS", 2)
    with trio.fail_after(20):
        held = world.sidecar.current_policy().version
        await _settled(world, held)
        _, _, version = world.authority.apply_policy(
            [(str(SpiffeId(TD, f"/other{i}")), str(WEB)) for i in range(3)]
        )
        await _settled(world, version)
    [doc] = world.feeds.answering(held)
    assert "delta" not in doc and len(doc["pairs"]) == 3
    world.enforces_what_the_authority_says()


async def test_a_delta_cut_from_another_version_is_refused_and_the_whole_list_fetched(
    world: World,
) -> None:
    with trio.fail_after(20):
        held = world.sidecar.current_policy().version
        await _settled(world, held)
        world.feeds.spoil_base = held - 1
        version = world.authority.allow(WEB, API)
        [refused] = await world.log.wait_for("feed_delta_refused")
        await _settled(world, version)
    assert refused["reason"] == "policy_delta_mismatch"
    assert f"cut from policy version {held - 1}, this sidecar holds {held}" in refused["detail"]
    query, doc = world.feeds.seen[-1]
    assert query["policy_version"] == "-1" and "delta" not in query
    assert "delta" not in doc and len(doc["pairs"]) == 41
    world.enforces_what_the_authority_says()
