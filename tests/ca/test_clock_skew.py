"""Clock skew: sidecars stamp their reports, the authority measures, doctor and status judge.

Reports go through `ControlApi.handle` with a real SVID as the client
certificate; the authority's wall clock is a hand-moved one, and a sidecar's
reading is that clock shifted, so nothing here waits on real time.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from ca_helpers import TD, Clock

from ca.api import ControlApi, Reply, Request
from ca.authority import Authority
from ca.doctor import check_state
from ca.status import render_status, status_document
from meshid.doctor import document
from meshid.ratelimit import FailureLimiter
from meshid.report import StatusReport, parse_report
from meshid.skew import SKEW_LIMIT, clock_offset
from meshid.spiffeid import SpiffeId
from meshid.svid import generate_key

WEB = SpiffeId(TD, "/web")
API = SpiffeId(TD, "/api")


def _post(
    authority: Authority,
    clock: Clock,
    sid: SpiffeId,
    doc: dict[str, Any],
    received: datetime | None = None,
) -> Reply:
    cert = authority.issue(sid, generate_key().public_key()).leaf
    api = ControlApi(authority, clock, time.monotonic, FailureLimiter())
    body = json.dumps(doc).encode()
    request = Request("POST", "/v1/report", {}, body, "127.0.0.1", cert, received=received)
    return api.handle(request)


def _report(instance: str, sent_at: datetime | None) -> dict[str, Any]:
    doc: dict[str, Any] = {"v": 1, "instance": instance, "bundle_sequence": 1}
    if sent_at is not None:
        doc["sent_at"] = sent_at.isoformat()
    return doc


def test_the_offset_is_zero_inside_the_window_and_the_distance_outside() -> None:
    t = datetime(2030, 1, 1, 12, 0, 0).astimezone()
    window = (t, t + timedelta(seconds=5))
    assert clock_offset(t + timedelta(seconds=3), *window) == timedelta(0)
    assert clock_offset(t + timedelta(seconds=65), *window) == timedelta(seconds=60)
    assert clock_offset(t - timedelta(seconds=40), *window) == timedelta(seconds=-40)
    assert timedelta(seconds=30) == SKEW_LIMIT


def test_sent_at_is_additive_on_the_wire() -> None:
    old = parse_report({"instance": "a"})
    assert old.sent_at is None
    stamped = replace(old, sent_at=datetime(2030, 1, 1).astimezone())
    assert parse_report(stamped.to_json()) == stamped
    with pytest.raises(Exception, match="sent_at"):
        parse_report({"instance": "a", "sent_at": "yesterday"})


def test_a_sidecar_ten_minutes_ahead_fails_doctor_and_one_in_sync_passes(
    state: Path, authority: Authority, clock: Clock
) -> None:
    now = clock.now
    assert _post(authority, clock, WEB, _report("w1", now + timedelta(minutes=10))).status == 200
    # a slow request (sent 20s before the authority handled it) is not skew
    slow = _report("a1", now - timedelta(seconds=20))
    assert _post(authority, clock, API, slow, received=now - timedelta(seconds=21)).status == 200
    checks = {c.name: c for c in check_state(state, clock)}
    skew = checks["clock_skew"]
    assert skew.ok is False and skew.hint
    assert "spiffe://example.org/web [w1] +600s" in skew.detail
    assert "/api" not in skew.detail
    doc = document([skew])["checks"]
    assert isinstance(doc, list)
    data = doc[0]["data"]
    assert data["limit_seconds"] == 30
    by_id = {s["spiffe_id"]: s["skew_seconds"] for s in data["sidecars"]}
    assert by_id == {str(WEB): 600.0, str(API): 0.0}
    # the same sidecar, back in sync, passes
    assert _post(authority, clock, WEB, _report("w1", now)).status == 200
    checks = {c.name: c for c in check_state(state, clock)}
    assert checks["clock_skew"].ok is True
    assert "30s" in checks["clock_skew"].detail


def test_a_sidecar_behind_by_more_than_the_request_took_is_skewed(
    state: Path, authority: Authority, clock: Clock
) -> None:
    received = clock.now - timedelta(seconds=2)
    doc = _report("w1", clock.now - timedelta(minutes=10))
    assert _post(authority, clock, WEB, doc, received=received).status == 200
    [entry], _ = authority.reports()
    assert entry.skew == pytest.approx(-598.0)
    assert not {c.name: c for c in check_state(state, clock)}["clock_skew"].ok


def test_an_old_sidecar_without_a_reading_is_accepted_and_not_judged(
    state: Path, authority: Authority, clock: Clock
) -> None:
    assert _post(authority, clock, WEB, _report("w1", None)).status == 200
    [entry], _ = authority.reports()
    assert entry.skew is None
    skew = {c.name: c for c in check_state(state, clock)}["clock_skew"]
    assert skew.ok is True


def test_a_reading_the_sidecar_sends_as_its_own_skew_is_not_trusted(
    authority: Authority, clock: Clock
) -> None:
    doc = {**_report("w1", clock.now), "clock_skew": 1e9}
    assert _post(authority, clock, WEB, doc).status == 200
    [entry], _ = authority.reports()
    assert entry.skew == 0.0


def test_status_shows_the_skew_of_each_sidecar(authority: Authority, clock: Clock) -> None:
    assert _post(authority, clock, WEB, _report("w1", clock.now + timedelta(minutes=10))).status
    assert _post(authority, clock, API, _report("a1", clock.now)).status
    lines = render_status(authority)
    assert any("[w1]" in line and "clock +600s" in line for line in lines)
    assert any(line.startswith("WARNING") and "[w1]" in line and "clock" in line for line in lines)
    doc = status_document(authority)
    sidecars = doc["sidecars"]
    assert isinstance(sidecars, list)
    assert {s["instance"]: s["clock_skew"] for s in sidecars} == {"w1": 600.0, "a1": 0.0}


def test_the_report_type_carries_the_reading() -> None:
    report = StatusReport("x", sent_at=datetime(2030, 1, 1).astimezone())
    assert report.to_json()["sent_at"] is not None


def test_the_ui_sidecar_table_shows_the_skew(authority: Authority, clock: Clock) -> None:
    from ca.ui import ServiceGraph

    authority.record_report(WEB, StatusReport("w1", sent_at=clock.now), skew=-45.5)
    authority.record_report(API, StatusReport("a1"))
    graph = ServiceGraph(clock)
    graph.refresh(authority)
    doc = json.loads(graph.route("GET", "/graph.json").body)
    assert {s["instance"]: s["clock_skew"] for s in doc["sidecars"]} == {"w1": -45.5, "a1": None}
    page = graph.route("GET", "/").body.decode()
    assert "<th>clock skew</th>" in page and "<td>-45s</td>" in page
