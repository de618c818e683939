"""`meshid ca serve --metrics`: a real process, scraped over a real socket and parsed."""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

from ca_helpers import MESHID, TD, Clock, make_csr, serving_process, tls_exchange, wait_event
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from prometheus_client.parser import text_string_to_metric_families

from ca.authority import Authority
from ca.metrics import CaMetrics, Live
from meshid.clock import system_clock
from meshid.report import StatusReport
from meshid.spiffeid import SpiffeId
from meshid.version import VERSION


def _address(doc: dict[str, object]) -> tuple[str, int]:
    host, _, port = str(doc["listen"]).rpartition(":")
    return host, int(port)


@contextmanager
def serving(state: Path, log: Path) -> Iterator[tuple[int, int, subprocess.Popen[bytes]]]:
    """`meshid ca serve --metrics 127.0.0.1:0`: the control-plane and metrics ports."""
    with serving_process(state, log, "--metrics", "127.0.0.1:0") as proc:
        _, port = _address(wait_event(log, "serving", proc, 30))
        _, metrics_port = _address(wait_event(log, "metrics_serving", proc, 30))
        yield port, metrics_port, proc


def _plain(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data


def scrape(port: int) -> dict[str, float]:
    """Every sample on /metrics, keyed `name{label="value",...}` (labels sorted)."""
    raw = _plain(port, b"GET /metrics HTTP/1.1\r\nhost: m\r\nconnection: close\r\n\r\n")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


def _enroll(port: int, bundle: Path, token: str) -> bytes:
    _, der = make_csr()
    csr = x509.load_der_x509_csr(der).public_bytes(serialization.Encoding.PEM).decode()
    body = json.dumps({"token": token, "csr": csr}).encode()
    return tls_exchange(
        port,
        bundle,
        b"POST /v1/enroll HTTP/1.1\r\nhost: ca\r\nconnection: close\r\n"
        b"content-length: %d\r\n\r\n%s" % (len(body), body),
    )


def test_counters_move_with_enrollments_and_refusals(state: Path, tmp_path: Path) -> None:
    authority = Authority.open(state, clock=system_clock())
    try:
        token = authority.create_token(SpiffeId(TD, "/web"))
    finally:
        authority.close()
    with serving(state, tmp_path / "ca.log") as (port, metrics_port, _proc):
        before = scrape(metrics_port)
        assert before[f'meshid_build_info{{component="authority",version="{VERSION}"}}'] == 1
        assert before["process_resident_memory_bytes{}"] > 0
        assert before["meshid_ca_root_expiry_seconds{}"] > 0
        assert before['meshid_ca_next_root{state="none"}'] == 1
        assert before['meshid_ca_connections{pool="anonymous"}'] == 0
        assert before["meshid_ca_watches{}"] == 0

        issued = _enroll(port, state / "bundle.pem", token)
        assert issued.startswith(b"HTTP/1.1 200"), issued[:200]
        assert f"server: meshid/{VERSION}".encode() in issued.lower()
        refused = _enroll(port, state / "bundle.pem", "mjt_not_a_token")
        assert refused.startswith(b"HTTP/1.1 4"), refused[:200]
        reason = json.loads(refused.partition(b"\r\n\r\n")[2])["error"]

        after = scrape(metrics_port)
    assert after['meshid_ca_enrollments_total{result="issued"}'] == 1
    assert after[f'meshid_ca_enrollments_total{{result="{reason}"}}'] == 1
    assert after[f'meshid_ca_refusals_total{{reason="{reason}"}}'] == 1
    assert after["meshid_ca_svids_issued_total{}"] == 1
    assert after['meshid_ca_http_requests_total{path="/v1/enroll",status="200"}'] == 1
    assert after["meshid_ca_db_call_seconds_count{}"] > before["meshid_ca_db_call_seconds_count{}"]


def test_hostile_input_on_the_metrics_port_does_not_end_the_server(
    state: Path, tmp_path: Path
) -> None:
    with serving(state, tmp_path / "ca.log") as (_port, metrics_port, proc):
        head = _plain(metrics_port, b"HEAD /metrics HTTP/1.1\r\nhost: m\r\n\r\n")
        status, _, rest = head.partition(b"\r\n")
        assert status == b"HTTP/1.1 200 OK"
        headers, _, body = rest.partition(b"\r\n\r\n")
        assert body == b"" and b"content-length: " in headers.lower()
        assert _plain(metrics_port, b"\x16\x03\x01\x02\x00garbage\r\n\r\n").startswith(
            b"HTTP/1.1 400"
        )
        assert _plain(metrics_port, b"BREW /metrics HTTP/1.1\r\nhost: m\r\n\r\n").startswith(
            b"HTTP/1.1 501"
        )
        assert _plain(metrics_port, b"POST /metrics HTTP/1.1\r\nhost: m\r\n\r\n").startswith(
            b"HTTP/1.1 405"
        )
        version = _plain(metrics_port, b"GET /version HTTP/1.1\r\nhost: m\r\n\r\n")
        assert version.endswith(VERSION.encode() + b"\n")
        assert proc.poll() is None
        assert "meshid_ca_root_expiry_seconds{}" in scrape(metrics_port)
        assert proc.poll() is None


def test_each_worker_serves_its_own_metrics(state: Path, tmp_path: Path) -> None:
    log = tmp_path / "ca.log"
    with serving_process(state, log, "--metrics", "127.0.0.1:0", "--workers", "2") as proc:
        lines = [wait_event(log, "metrics_serving", proc, 30, worker=i) for i in (0, 1)]
        assert all(line["version"] == VERSION for line in lines)
        ports = {_address(line)[1] for line in lines}
        assert len(ports) == 2  # port 0: each worker a port of its own
        for port in ports:
            assert scrape(port)['meshid_ca_next_root{state="none"}'] == 1
        health = tls_exchange(
            _address(wait_event(log, "serving", proc, 30, worker=0))[1],
            state / "bundle.pem",
            b"GET /healthz HTTP/1.1\r\nhost: ca\r\nconnection: close\r\n\r\n",
        )
        assert json.loads(health.partition(b"\r\n\r\n")[2])["version"] == VERSION


def test_the_earliest_svid_among_reporting_sidecars(authority: Authority, clock: Clock) -> None:
    metrics = CaMetrics(clock, Live(lambda: {}, lambda: 0))
    soon, later = clock() + timedelta(minutes=10), clock() + timedelta(hours=1)
    authority.record_report(SpiffeId(TD, "/web"), StatusReport("web-1", svid_not_after=later))
    authority.record_report(SpiffeId(TD, "/api"), StatusReport("api-1", svid_not_after=soon))
    authority.record_report(SpiffeId(TD, "/db"), StatusReport("db-1"))  # not enrolled yet
    metrics.refresh(authority)
    samples = {
        s.name: s.value
        for family in text_string_to_metric_families(metrics.route("GET", "/metrics").body.decode())
        for s in family.samples
    }
    assert samples["meshid_ca_reporting_sidecars"] == 3
    assert samples["meshid_ca_sidecar_svid_expiry_seconds"] == 600
    clock.advance(timedelta(minutes=4))
    assert (
        "meshid_ca_sidecar_svid_expiry_seconds 360.0"
        in metrics.route("GET", "/metrics").body.decode()
    )


def test_a_bad_or_taken_metrics_address_is_one_line(state: Path) -> None:
    def refused(metrics: str) -> str:
        argv = [MESHID, "ca", "serve", "--state", str(state), "--listen", "127.0.0.1:0"]
        done = subprocess.run(
            [*argv, "--metrics", metrics], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 1
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
        return done.stderr

    assert "--metrics 'nonsense': expected HOST:PORT" in refused("nonsense")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert f"cannot listen on 127.0.0.1:{port}" in refused(f"127.0.0.1:{port}")
