"""The service graph page (`meshid ca serve --ui`): rendered, escaped, read-only, in a browser."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from ca_helpers import TD, Clock, serving_process, wait_event

from ca.authority import Authority
from ca.ui import ServiceGraph
from meshid.clock import system_clock
from meshid.report import PairCount, PairRefusal, StatusReport
from meshid.spiffeid import SpiffeId

WEB, API, DB = SpiffeId(TD, "/web"), SpiffeId(TD, "/api"), SpiffeId(TD, "/db")
HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)>'
CHROMIUM = "/usr/bin/chromium"
BROWSER_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _two_sidecars(authority: Authority) -> str:
    """web and api allowed to talk, both reporting the one connection between them."""
    authority.allow(WEB, API)
    authority.allow(API, DB)
    later = datetime.now(UTC) + timedelta(hours=1)
    authority.record_report(
        WEB,
        StatusReport(
            "web-1",
            bundle_sequence=3,
            svid_serial="0a1b",
            svid_not_after=later,
            live_connections=2,
            pairs=(PairCount("outbound", API, 2),),
            refusals=(PairRefusal("inbound", DB, "deny", "not_allowed", 4),),
        ),
    )
    authority.record_report(
        API,
        StatusReport(
            "api-1",
            svid_serial=HOSTILE,  # what a workload reports is hostile
            svid_not_after=later,
            pairs=(PairCount("inbound", WEB, 2),),
            refusals=(PairRefusal("outbound", WEB, "cut", "policy_revoked", 1),),
        ),
    )
    return authority.create_token(DB)


def test_page_shows_nodes_edges_and_sidecars_and_no_token(
    authority: Authority, clock: Clock
) -> None:
    token = _two_sidecars(authority)
    graph = ServiceGraph(clock)
    graph.refresh(authority)
    doc = json.loads(graph.route("GET", "/graph.json").body)
    assert doc["nodes"] == [str(API), str(DB), str(WEB)]
    edges = {(e["from"], e["to"]): e for e in doc["edges"]}
    assert edges[str(WEB), str(API)]["live"] == 2 and edges[str(WEB), str(API)]["allowed"]
    assert edges[str(API), str(DB)] == {
        "from": str(API),
        "to": str(DB),
        "allowed": True,
        "live": 0,
        "refused": [],
    }
    # a refusal names an edge the allow-list does not have; a cut, one it did
    assert edges[str(DB), str(WEB)]["allowed"] is False
    assert edges[str(DB), str(WEB)]["refused"] == [
        {"kind": "deny", "reason": "not_allowed", "count": 4}
    ]
    assert edges[str(API), str(WEB)]["refused"] == [
        {"kind": "cut", "reason": "policy_revoked", "count": 1}
    ]
    assert [s["instance"] for s in doc["sidecars"]] == ["api-1", "web-1"]
    assert "generation 1 active" in doc["rollover"]
    assert "current bundle sequence" in doc["rollover"]
    page = graph.route("GET", "/").body.decode()
    assert page.count('class="edge"') == 4 and page.count('class="node"') == 3
    assert "4 deny not_allowed" in page
    assert "web-1" in page and "0a1b" in page
    assert token not in page and token not in json.dumps(doc)
    assert "PRIVATE KEY" not in page


def test_hostile_report_renders_as_text(authority: Authority, clock: Clock) -> None:
    authority.record_report(WEB, StatusReport("web-1", svid_serial=HOSTILE))
    graph = ServiceGraph(clock)
    graph.refresh(authority)
    page = graph.route("GET", "/").body.decode()
    assert HOSTILE not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    # the only script on the page is the page's own
    assert page.count("<script>") == 1


def test_the_snapshot_is_read_at_most_every_few_seconds(authority: Authority, clock: Clock) -> None:
    graph = ServiceGraph(clock)
    graph.refresh(authority)
    authority.allow(WEB, API)
    graph.refresh(authority)
    assert json.loads(graph.route("GET", "/graph.json").body)["edges"] == []
    clock.advance(timedelta(seconds=6))
    graph.refresh(authority)
    assert len(json.loads(graph.route("GET", "/graph.json").body)["edges"]) == 1
    assert graph.route("GET", "/nope").status == 404


def _address(doc: dict[str, object]) -> tuple[str, int]:
    host, _, port = str(doc["listen"]).rpartition(":")
    return host, int(port)


@contextmanager
def serving_ui(state: Path, log: Path) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    with serving_process(state, log, "--ui", "127.0.0.1:0") as proc:
        wait_event(log, "serving", proc, 30)
        _, port = _address(wait_event(log, "ui_serving", proc, 30))
        yield port, proc


def _plain(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data


def _populated_state(tmp_path: Path) -> Path:
    state = tmp_path / "real-state"
    Authority.init(state, TD, clock=system_clock()).close()
    authority = Authority.open(state, clock=system_clock())
    try:
        _two_sidecars(authority)
    finally:
        authority.close()
    return state


def test_real_server_serves_the_page_read_only(tmp_path: Path) -> None:
    state = _populated_state(tmp_path)
    with serving_ui(state, tmp_path / "log.jsonl") as (port, _):
        raw = _plain(port, b"GET / HTTP/1.1\r\nhost: u\r\nconnection: close\r\n\r\n")
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"text/html" in head
        assert b"spiffe://" in body and b'class="edge"' in body
        post = _plain(port, b"POST / HTTP/1.1\r\nhost: u\r\ncontent-length: 0\r\n\r\n")
        assert post.startswith(b"HTTP/1.1 405")


@pytest.mark.slow
def test_page_in_a_real_browser(tmp_path: Path) -> None:
    if not Path(CHROMIUM).exists() or shutil.which(CHROMIUM) is None:
        pytest.skip(f"{CHROMIUM} is missing (make system-packages installs it)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    state = _populated_state(tmp_path)
    with serving_ui(state, tmp_path / "log.jsonl") as (port, _), sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, args=BROWSER_ARGS, headless=True
        )
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("dialog", lambda d: errors.append(f"dialog: {d.message}"))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"http://127.0.0.1:{port}/", timeout=20_000)
            assert page.locator("svg#graph .node").count() == 3
            assert page.locator("svg#graph .edge").count() == 4
            assert page.locator("#edges tr").count() == 5  # the header and four edges
            assert "4 deny not_allowed" in page.locator("#edges").inner_text()
            sidecars = page.locator("#sidecars").inner_text()
            assert "web-1" in sidecars and HOSTILE in sidecars  # shown as text, never run
            # the script swaps in a fresh copy without errors
            page.evaluate("document.getElementById('content').setAttribute('data-old', '1')")
            page.wait_for_function(
                "!document.getElementById('content').hasAttribute('data-old')", timeout=15_000
            )
            page.screenshot(path=str(tmp_path / "graph.png"), full_page=True)
            assert (tmp_path / "graph.png").stat().st_size > 0
            assert errors == []
        finally:
            browser.close()


def test_each_worker_serves_the_page_on_a_port_of_its_own(tmp_path: Path) -> None:
    state = _populated_state(tmp_path)
    log = tmp_path / "log.jsonl"
    with serving_process(state, log, "--ui", "127.0.0.1:0", "--workers", "2") as proc:
        lines = [wait_event(log, "ui_serving", proc, 30, worker=i) for i in (0, 1)]
        ports = {_address(line)[1] for line in lines}
        assert len(ports) == 2
        for port in ports:
            raw = _plain(port, b"GET /graph.json HTTP/1.1\r\nhost: u\r\nconnection: close\r\n\r\n")
            doc = json.loads(raw.partition(b"\r\n\r\n")[2])
            assert str(WEB) in doc["nodes"]


def test_no_ui_unless_asked(tmp_path: Path) -> None:
    state = _populated_state(tmp_path)
    log = tmp_path / "log.jsonl"
    with serving_process(state, log) as proc:
        wait_event(log, "serving", proc, 30)
        assert "ui_serving" not in log.read_text()
