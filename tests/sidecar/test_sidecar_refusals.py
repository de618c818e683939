"""The last hour's refusals and cuts a sidecar reports, per peer and reason."""

from __future__ import annotations

from meshid.report import MAX_REFUSALS, PairRefusal, StatusReport, parse_report
from meshid.spiffeid import SpiffeId, TrustDomain
from sidecar.refusals import MAX_KEYS, RecentRefusals

TD = TrustDomain("example.org")
API = SpiffeId(TD, "/api")


def test_counts_fall_out_of_the_hour() -> None:
    counts = RecentRefusals()
    counts.add("inbound", API, "deny", "not_allowed", now=0.0)
    counts.add("inbound", API, "deny", "not_allowed", now=1800.0)
    counts.add("outbound", API, "cut", "policy_revoked", now=1800.0)
    assert counts.recent(1800.0) == [
        PairRefusal("inbound", API, "deny", "not_allowed", 2),
        PairRefusal("outbound", API, "cut", "policy_revoked", 1),
    ]
    assert [r.count for r in counts.recent(3700.0)] == [1, 1]
    assert counts.recent(5500.0) == []


def test_a_scan_of_many_peers_stays_bounded() -> None:
    counts = RecentRefusals()
    for i in range(MAX_KEYS + 50):
        counts.add("inbound", SpiffeId(TD, f"/scan/{i}"), "deny", "not_allowed", now=float(i))
    recent = counts.recent(2000.0)
    assert len(recent) == MAX_KEYS
    assert SpiffeId(TD, "/scan/0") not in {r.peer_id for r in recent}


def test_refusals_round_trip_and_are_sampled_past_the_limit() -> None:
    refusals = tuple(
        PairRefusal("inbound", SpiffeId(TD, f"/p{i}"), "deny", "not_allowed", 1)
        for i in range(MAX_REFUSALS + 3)
    )
    report = StatusReport("web-1", refusals=refusals[:MAX_REFUSALS])
    assert parse_report(report.to_json()) == report
    doc = report.to_json()
    doc["refusals"] = [*doc["refusals"], *doc["refusals"][:3]]
    parsed = parse_report(doc)
    assert len(parsed.refusals) == MAX_REFUSALS and parsed.refusals_omitted == 3
    assert parse_report({"instance": "old-1"}).refusals == ()  # an older sidecar


def test_refusals_give_way_to_the_byte_limit() -> None:
    from meshid.policy import Policy
    from meshid.report import MAX_REPORT_BYTES, decode_report
    from sidecar.status import build_report

    long = "/" + "x" * 2000
    refusals = [
        PairRefusal("inbound", SpiffeId(TD, f"{long}{i}"), "deny", "not_allowed", 1)
        for i in range(MAX_REFUSALS)
    ]
    built = build_report("web-1", None, Policy.build([]), [], 0, {}, refusals)
    assert 0 < len(built.refusals) < MAX_REFUSALS
    assert built.refusals_omitted == MAX_REFUSALS - len(built.refusals)
    body = built.encode().encode()
    assert len(body) <= MAX_REPORT_BYTES
    assert decode_report(body) == built
