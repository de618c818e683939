"""The address map: `meshid service add/remove/list`, conflicts, and the feed that carries it.

An address claimed by two identities is a conflict: it leaves the map (a
captured connection to it is refused) and is shown, never settled by the
latest claim. Every change moves the policy version so that watchers wake.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ca_helpers import run

from ca.authority import Authority
from meshid.feedwire import Feed
from meshid.report import StatusReport, parse_report
from meshid.spiffeid import SpiffeId
from meshid.wire import WireError

API = "spiffe://example.org/api"
DB = "spiffe://example.org/db"
WEB = "spiffe://example.org/web"

BACKENDS = ("sqlite", "postgresql")  # every test here runs on both engines


def test_add_list_remove(state: Path) -> None:
    added = run("service", "add", "api", "198.18.0.3:8080", "--state", str(state))
    assert added.exit_code == 0, added.stderr
    assert added.stdout == f"mapped 198.18.0.3:8080 -> {API} (policy version 1)\n"
    again = run("service", "add", "api", "198.18.0.3:8080", "--state", str(state))
    assert again.exit_code == 0 and "nothing changed" in again.stdout
    listed = run("service", "list", "--json", "--state", str(state))
    doc = json.loads(listed.stdout)
    assert doc["services"] == [
        {"address": "198.18.0.3:8080", "spiffe_id": API, "origin": "operator", "conflict": False}
    ]
    assert doc["conflicts"] == []
    removed = run("service", "remove", "api", "198.18.0.3:8080", "--state", str(state))
    assert removed.exit_code == 0, removed.stderr
    assert run("service", "list", "--state", str(state)).stdout == "no services mapped\n"
    missing = run("service", "remove", "api", "198.18.0.3:8080", "--state", str(state))
    assert missing.exit_code != 0 and "not mapped" in missing.stderr


def test_bad_address_is_one_line(state: Path) -> None:
    result = run("service", "add", "api", "api.internal:8080", "--state", str(state))
    assert result.exit_code != 0
    assert "is not IP:PORT" in result.stderr and "Traceback" not in result.stderr


def test_conflict_is_shown_and_left_out_of_the_feed(authority: Authority, state: Path) -> None:
    authority.add_service(SpiffeId.parse(API), "198.18.0.3", 8080)
    authority.add_service(SpiffeId.parse(API), "2001:db8::3", 8080)
    authority.set_advertised(SpiffeId.parse(DB), [("198.18.0.3", 8080)])
    feed = Feed.parse({"v": 1, **authority.feed(SpiffeId.parse(WEB))})
    assert feed.addresses == (("2001:db8::3", 8080, SpiffeId.parse(API)),)
    listed = run("service", "list", "--json", "--state", str(state))
    doc = json.loads(listed.stdout)
    assert doc["conflicts"] == [{"address": "198.18.0.3:8080", "claimed_by": [API, DB]}]
    text = run("service", "list", "--state", str(state)).stdout
    assert "198.18.0.3:8080  spiffe://example.org/db  (advertised)  CONFLICT" in text


def test_advertised_addresses_replace_their_own_and_move_the_version(
    authority: Authority,
) -> None:
    api = SpiffeId.parse(API)
    before = authority.policy().version
    assert authority.set_advertised(api, [("198.18.0.3", 8080)])
    assert not authority.set_advertised(api, [("198.18.0.3", 8080)])  # unchanged: no wake-up
    assert authority.policy().version == before + 1
    assert [e.action for e in authority.store.audit_entries()][-1] == "service_advertised"
    assert authority.set_advertised(api, [("198.18.0.4", 8080)])
    assert [(e.host, e.port) for e in authority.services()] == [("198.18.0.4", 8080)]


def test_reports_advertise_into_the_map(authority: Authority) -> None:
    api = SpiffeId.parse(API)
    report = parse_report(
        StatusReport(instance="a", advertise=("198.18.0.3:8080", "not-an-address")).to_json()
    )
    authority.record_report(api, report)
    assert authority.record_advertised(api)
    assert [(e.host, e.port, e.origin) for e in authority.services()] == [
        ("198.18.0.3", 8080, "advertised")
    ]
    authority.record_report(api, StatusReport(instance="b", advertise=("198.18.0.9:8080",)))
    assert authority.record_advertised(api)  # two instances: the union of what they say
    assert len(authority.services()) == 2
    assert not authority.record_advertised(api)


def test_ca_status_shows_a_conflict(authority: Authority, state: Path) -> None:
    authority.add_service(SpiffeId.parse(API), "198.18.0.3", 8080)
    authority.add_service(SpiffeId.parse(DB), "198.18.0.3", 8080)
    status = run("ca", "status", "--state", str(state))
    assert status.exit_code == 0, status.stderr
    assert f"WARNING address 198.18.0.3:8080 is claimed by {API}, {DB}: a conflict" in status.stdout


def test_feed_addresses_are_additive_and_checked() -> None:
    base = {
        "v": 1,
        "policy_version": 1,
        "revocation_version": 0,
        "bundle_sequence": 1,
        "pairs": [],
        "revoked": [],
        "bundle": "pem",
    }
    assert Feed.parse(base).addresses == ()  # an older authority sends none
    feed = Feed.parse({**base, "addresses": [["2001:DB8::3", 8080, API]]})
    assert feed.addresses == (("2001:db8::3", 8080, SpiffeId.parse(API)),)
    assert Feed.parse(feed.to_json()) == feed
    for bad in (
        [["api.internal", 8080, API]],
        [["198.18.0.3", 0, API]],
        [["198.18.0.3", 8080]],
        [["198.18.0.3", 8080, "not an id"]],
        "198.18.0.3:8080",
    ):
        with pytest.raises(WireError, match="addresses"):
            Feed.parse({**base, "addresses": bad})
