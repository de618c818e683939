"""Sidecar reports: checked whole at the API, bounded per identity, shown safely.

Every case goes through `ControlApi.handle` with a real SVID from the
authority as the client certificate, as the TLS shell would pass it.
"""

from __future__ import annotations

import json
import sqlite3
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from ca_helpers import TD, Clock, query, rechain, run, snapshot
from cryptography import x509

from ca.api import ControlApi, Reply, Request
from ca.audit import AUDIT_HEAD, AUDIT_KEY
from ca.authority import Authority
from ca.schema import SCHEMA_VERSION
from ca.status import connections_of_pair, render_status
from ca.store import DB_NAME, Store
from ca.values import MAX_INSTANCES, REPORT_FORGET, printable
from meshid.clock import system_clock
from meshid.ratelimit import FailureLimiter
from meshid.report import (
    MAX_CONNECTIONS,
    MAX_PAIRS,
    MAX_REPORT_BYTES,
    ConnectionInfo,
    PairCount,
    StatusReport,
    parse_report,
)
from meshid.spiffeid import SpiffeId
from meshid.svid import generate_key

WEB = SpiffeId(TD, "/web")
API = SpiffeId(TD, "/api")


def _cert(authority: Authority, sid: SpiffeId) -> x509.Certificate:
    return authority.issue(sid, generate_key().public_key()).leaf


def _post(authority: Authority, clock: Clock, cert: x509.Certificate, doc: Any) -> Reply:
    api = ControlApi(authority, clock, time.monotonic, FailureLimiter())
    body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    return api.handle(Request("POST", "/v1/report", {}, body, "127.0.0.1", cert))


def _stored(state: Path) -> list[tuple[object, ...]]:
    return query(state, "SELECT spiffe_id, instance, report FROM reports ORDER BY 1, 2")


def _good(instance: str, **extra: Any) -> dict[str, Any]:
    return {
        "instance": instance,
        "svid_serial": "1f",
        "svid_not_after": "2030-01-01T00:00:00+00:00",
        "bundle_sequence": 1,
        "policy_version": 0,
        "revocation_version": 0,
        "live_connections": 1,
        "pairs": [{"direction": "outbound", "peer_id": str(API), "count": 1}],
        "connections": [
            {
                "id": 1,
                "direction": "outbound",
                "peer_id": str(API),
                "peer_addr": "127.0.0.1:4000",
                "started": "2026-01-01T00:00:00+00:00",
                "bytes_in": 10,
                "bytes_out": 20,
            }
        ],
        "quarantined": [{"peer": "127.0.0.2", "seconds_left": 5}],
        **extra,
    }


# -- limits ---------------------------------------------------------------------


def test_one_identity_keeps_at_most_the_cap_of_instances(
    state: Path, authority: Authority, clock: Clock
) -> None:
    web, api = _cert(authority, WEB), _cert(authority, API)
    assert _post(authority, clock, api, _good("api-0")).status == 200
    for i in range(300):
        clock.advance(timedelta(milliseconds=10))
        reply = _post(authority, clock, web, _good(f"web-{i}"))
        assert reply.status == 200, reply.body  # a restarting pod is never locked out
    rows = _stored(state)
    kept = sorted(str(r[1]) for r in rows if r[0] == str(WEB))
    assert len(kept) == MAX_INSTANCES
    assert kept == sorted(f"web-{i}" for i in range(300 - MAX_INSTANCES, 300))  # the newest
    assert [r[1] for r in rows if r[0] == str(API)] == ["api-0"]  # another identity's stays


def test_the_instance_reporting_now_is_kept_even_when_its_clock_ties(
    state: Path, authority: Authority, clock: Clock
) -> None:
    web = _cert(authority, WEB)
    for i in range(MAX_INSTANCES + 3):  # all at the same instant
        assert _post(authority, clock, web, _good(f"w{i}")).status == 200
        assert f"w{i}" in [r[1] for r in _stored(state)]
    assert len(_stored(state)) == MAX_INSTANCES


def test_old_reports_are_forgotten(state: Path, authority: Authority, clock: Clock) -> None:
    web, api = _cert(authority, WEB), _cert(authority, API)
    assert _post(authority, clock, web, _good("w1")).status == 200
    clock.advance(REPORT_FORGET + timedelta(seconds=1))
    assert _post(authority, clock, api, _good("a1")).status == 200
    assert [r[1] for r in _stored(state)] == ["a1"]


def test_an_oversized_report_is_refused_and_the_previous_one_stays(
    state: Path, authority: Authority, clock: Clock
) -> None:
    web = _cert(authority, WEB)
    assert _post(authority, clock, web, _good("w1")).status == 200
    before = snapshot(state)
    big = _good("w1", padding="x" * MAX_REPORT_BYTES)
    reply = _post(authority, clock, web, big)
    assert (reply.status, reply.body["error"]) == (413, "report_too_large")
    pairs = _good("w1", pairs=[_good("w1")["pairs"][0]] * (MAX_PAIRS + 1))
    reply = _post(authority, clock, web, pairs)
    assert (reply.status, reply.body["error"]) == (413, "report_too_large")
    assert "pairs" in reply.body["message"]
    assert snapshot(state) == before


def test_long_sample_lists_are_cut_to_their_limit_and_counted(
    state: Path, authority: Authority, clock: Clock
) -> None:
    """Connections and quarantined peers are samples: a busy or attacked sidecar keeps reporting."""
    web = _cert(authority, WEB)
    connection = _good("w1")["connections"][0]
    doc = _good(
        "w1",
        connections=[connection] * (MAX_CONNECTIONS + 5) + ["not even checked"],
        quarantined=[{"peer": f"10.0.0.{i}", "seconds_left": 9} for i in range(100)],
    )
    assert _post(authority, clock, web, doc).status == 200
    (entry,), skipped = authority.reports()
    assert skipped == []
    assert len(entry.report.connections) == MAX_CONNECTIONS
    assert entry.report.connections_omitted == 6
    assert (len(entry.report.quarantined), entry.report.quarantined_omitted) == (16, 84)
    stored = json.loads(str(_stored(state)[0][2]))
    assert len(stored["connections"]) == MAX_CONNECTIONS  # what is kept is bounded too
    text = "\n".join(render_status(authority))
    assert "peer_quarantined 84 more peer(s) not listed" in text
    lines, total = connections_of_pair(authority.reports()[0], WEB, API, clock())
    assert total == 1 and lines[-1].strip().startswith("(6 more connection(s)")


# -- identity ---------------------------------------------------------------------


def test_one_identity_cannot_replace_anothers_report(
    state: Path, authority: Authority, clock: Clock
) -> None:
    web, api = _cert(authority, WEB), _cert(authority, API)
    assert _post(authority, clock, api, _good("shared", bundle_sequence=1)).status == 200
    assert _post(authority, clock, web, _good("shared", bundle_sequence=0)).status == 200
    rows = {(str(r[0]), str(r[1])): json.loads(str(r[2])) for r in _stored(state)}
    assert rows[(str(API), "shared")]["bundle_sequence"] == 1  # untouched
    assert rows[(str(WEB), "shared")]["bundle_sequence"] == 0
    # the rollover gate still sees web's lag; api's report does not answer for it
    authority.rotate(timedelta(0))  # bundle 2
    assert _post(authority, clock, api, _good("shared", bundle_sequence=2)).status == 200
    assert authority.rotation_status() == (2, [f"{WEB} (shared)"])
    assert _post(authority, clock, web, _good("shared", bundle_sequence=2)).status == 200
    assert authority.rotation_status() == (2, [])


def test_the_identity_in_the_body_is_ignored(
    state: Path, authority: Authority, clock: Clock
) -> None:
    web = _cert(authority, WEB)
    assert _post(authority, clock, web, _good("w1", spiffe_id=str(API))).status == 200
    assert [r[0] for r in _stored(state)] == [str(WEB)]


# -- validation -------------------------------------------------------------------

BAD = {
    "not an object": [1, 2],
    "no instance": {"bundle_sequence": 1},
    "instance with a newline": _good("w1\nspiffe://example.org/api [x]"),
    "instance too long": _good("w" * 65),
    "sequence a string": _good("w1", bundle_sequence="3"),
    "sequence a bool": _good("w1", bundle_sequence=True),
    "sequence negative": _good("w1", bundle_sequence=-1),
    "sequence huge": _good("w1", bundle_sequence=2**64),
    "serial with an escape": _good("w1", svid_serial="\x1b[2J"),
    "expiry not a time": _good("w1", svid_not_after="soon"),
    "expiry without offset": _good("w1", svid_not_after="2030-01-01T00:00:00"),
    "pairs not a list": _good("w1", pairs={"a": 1}),
    "pair not an object": _good("w1", pairs=["x"]),
    "pair direction": _good("w1", pairs=[{"direction": "up", "peer_id": str(API), "count": 1}]),
    "pair peer not an ID": _good(
        "w1", pairs=[{"direction": "inbound", "peer_id": "api", "count": 1}]
    ),
    "pair count a float": _good(
        "w1", pairs=[{"direction": "inbound", "peer_id": str(API), "count": 1.5}]
    ),
    "connection address with a newline": _good(
        "w1",
        connections=[
            {**_good("w1")["connections"][0], "peer_addr": "1.2.3.4\nWARNING forged line"}
        ],
    ),
    "quarantined peer not text": _good("w1", quarantined=[{"peer": 5, "seconds_left": 1}]),
    "not JSON": b"{nope",
    "not UTF-8": b"\xff\xfe",
}


@pytest.mark.parametrize("doc", list(BAD.values()), ids=list(BAD))
def test_a_malformed_report_is_refused_whole(
    state: Path, authority: Authority, clock: Clock, doc: Any
) -> None:
    web = _cert(authority, WEB)
    before = snapshot(state)
    reply = _post(authority, clock, web, doc)
    assert (reply.status, reply.body["error"]) == (400, "invalid_report"), reply.body
    assert "\n" not in reply.body["message"]
    assert snapshot(state) == before


def test_a_full_report_round_trips(authority: Authority, clock: Clock) -> None:
    report = parse_report(_good("w1"))
    assert parse_report(report.to_json()) == report
    assert _post(authority, clock, _cert(authority, WEB), _good("w1")).status == 200


# -- what reaches the operator's terminal -----------------------------------------


def _raw_report(state: Path, sid: str, instance: str, report: str, seen: float) -> None:
    conn = sqlite3.connect(state / DB_NAME)
    try:
        conn.execute(
            "INSERT INTO reports (spiffe_id, instance, seen_at, report) VALUES (?, ?, ?, ?)",
            (sid, instance, seen, report),
        )
        conn.commit()
    finally:
        conn.close()


@pytest.mark.parametrize(
    "report",
    ["not json", "[]", '{"instance": "w9", "bundle_sequence": "x"}', '{"instance": "other"}'],
)
def test_a_malformed_stored_report_is_skipped_with_a_note(
    state: Path, authority: Authority, clock: Clock, report: str
) -> None:
    web = _cert(authority, WEB)
    assert _post(authority, clock, web, _good("w1")).status == 200
    _raw_report(state, str(API), "w9", report, clock().timestamp())
    lines = render_status(authority)
    assert any("[w9] is malformed and was skipped" in line for line in lines)
    assert any(line.startswith(f"  {WEB} [w1] seen") for line in lines)  # the rest still shows
    authority.allow(WEB, API)
    result = run("policy", "deny", "web", "api", "--dry-run", "--state", str(state))
    assert result.exit_code == 0, result.output
    assert "malformed and was skipped" in result.stderr


def test_control_characters_from_a_stored_row_are_escaped(
    state: Path, authority: Authority, clock: Clock
) -> None:
    forged = "w1\n  spiffe://example.org/api [fake] seen 0s ago\x1b[31m"
    _raw_report(state, str(WEB), forged, json.dumps({"instance": forged}), clock().timestamp())
    lines = render_status(authority)
    text = "\n".join(lines)
    assert "\x1b" not in text
    assert not any(line.startswith("  spiffe://example.org/api [fake]") for line in lines)
    assert "w1\\n  spiffe://example.org/api [fake]" in text
    result = run("ca", "status", "--state", str(state))
    assert result.exit_code == 0 and "\x1b" not in result.output


def test_every_workload_field_is_escaped_on_display(clock: Clock) -> None:
    """Even a report that bypassed the parse cannot forge a line or send an escape."""
    report = StatusReport(
        "w1",
        pairs=(PairCount("outbound", API, 1),),
        connections=(ConnectionInfo(7, "outbound", API, "1.2.3.4\n  forged\x1b[2J", None, 1, 2),),
    )
    from ca.values import SidecarReport

    lines, total = connections_of_pair(
        [SidecarReport("w1\r", WEB, clock(), report)], WEB, API, clock()
    )
    assert total == 1
    assert all("\n" not in line and "\x1b" not in line and "\r" not in line for line in lines)
    assert printable("a\x00b\u202ec") == "a\\x00b\\u202ec"
    assert printable("plain text") == "plain text"


# -- schema -----------------------------------------------------------------------

V1_REPORTS = """CREATE TABLE reports (
    instance TEXT PRIMARY KEY,
    spiffe_id TEXT NOT NULL,
    seen_at REAL NOT NULL,
    report TEXT NOT NULL
)"""


def _make_version_1(state: Path, rows: list[tuple[str, str, float, str]]) -> None:
    """Turn a fresh authority into what version 1 made: its reports table, an unkeyed
    audit chain, no audit key or head files, and no schema version stored."""
    rechain(state)
    (state / AUDIT_KEY).unlink()
    (state / AUDIT_HEAD).unlink()
    conn = sqlite3.connect(state / DB_NAME)
    try:
        conn.execute("DROP TABLE reports")
        conn.execute("DROP TABLE attestors")  # tables of later versions
        conn.execute("DROP TABLE used_jwts")
        conn.execute(V1_REPORTS)
        conn.executemany("INSERT INTO reports VALUES (?, ?, ?, ?)", rows)
        conn.execute("UPDATE settings SET value = '1' WHERE name = 'schema_version'")
        conn.execute("PRAGMA user_version = 0")
        conn.commit()
    finally:
        conn.close()


def test_a_version_1_database_is_migrated_at_open(tmp_path: Path, clock: Clock) -> None:
    state = tmp_path / "old"
    Authority.init(state, TD, clock=clock).close()
    seen = clock().timestamp()
    _make_version_1(state, [("shared", str(API), seen, json.dumps({"instance": "shared"}))])
    assert query(state, "PRAGMA user_version") == [(0,)]
    authority = Authority.open(state, clock=clock)
    try:
        assert query(state, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
        assert query(state, "SELECT value FROM settings WHERE name = 'schema_version'") == [
            (str(SCHEMA_VERSION),)
        ]
        assert _stored(state)[0][:2] == (str(API), "shared")
        assert _post(authority, clock, _cert(authority, WEB), _good("shared")).status == 200
        assert [(r[0], r[1]) for r in _stored(state)] == [
            (str(API), "shared"),
            (str(WEB), "shared"),
        ]
        assert authority.store.verify_audit()[1] is None
        assert [e.action for e in authority.store.audit_entries()] == [
            "init",
            "audit_keyed",
            "issue",
        ]
    finally:
        authority.close()
    assert json.loads((state / AUDIT_KEY).read_text())["keyed_from"] == 2
    Store.open(state / DB_NAME, clock=system_clock()).close()  # opening again changes nothing


def test_a_database_from_a_newer_version_is_refused(state: Path) -> None:
    conn = sqlite3.connect(state / DB_NAME)
    try:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
        conn.commit()
    finally:
        conn.close()
    before = snapshot(state)
    result = run("ca", "status", "--state", str(state))
    assert result.exit_code == 1 and "made by a newer meshid" in result.stderr
    assert snapshot(state) == before
