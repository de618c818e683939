"""The fan-out bench's own arithmetic and report: addresses, percentiles, the RESULTS.md section."""

from __future__ import annotations

import gc
import ipaddress
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.fanout import (
    MARKER,
    GcTime,
    family,
    family_cpu_seconds,
    free_port_run,
    percentiles,
    render,
    source_address,
    write_section,
)


def test_every_simulated_sidecar_has_a_loopback_address_of_its_own() -> None:
    addresses = [source_address(i) for i in range(70_000)]
    assert len(set(addresses)) == len(addresses)
    assert all(ipaddress.ip_address(a) in ipaddress.ip_network("127.0.0.0/8") for a in addresses)
    assert "127.0.0.1" not in addresses  # the authority's own address stays out of the fleet


def test_percentiles_of_a_known_spread() -> None:
    got = percentiles([float(i) for i in range(1, 101)])
    assert got == {"p50": 51.0, "p99": 100.0, "max": 100.0}
    assert percentiles([0.5]) == {"p50": 0.5, "p99": 0.5, "max": 0.5}


def _result(n: int) -> dict[str, Any]:
    spread = {"p50": 0.1, "p99": 0.2, "max": 0.3}
    return {
        "n": n,
        "rss_idle_mib": 49.0,
        "rss_connected_mib": 49.0 + n * 0.08,
        "rss_per_sidecar_kib": 80.0,
        "propagation_s": spread,
        "server_cpu_per_change_s": 0.001 * n,
        "restart": {"down_s": 1.0, "renew_s": spread, "parked_again_s": 2.0},
        "client_errors": {"authority_unreachable": n},
        "when": "2026-01-01 00:00 UTC",
        "loadavg": ["1.00", "1.00", "1.00"],
    }


def test_the_section_lists_every_size_in_order_and_replaces_itself(tmp_path: Path) -> None:
    results = {"1000": _result(1000), "100": _result(100)}
    section = render(results)
    rows = [line for line in section.splitlines() if line.startswith("| 1")]
    assert [row.split("|")[1].strip() for row in rows] == ["100", "1,000"]
    md = tmp_path / "RESULTS.md"
    md.write_text("# Results\n\nthe other benchmarks\n")
    write_section(md, section)
    write_section(md, render({**results, "10000": _result(10000)}))
    text = md.read_text()
    assert text.startswith("# Results\n\nthe other benchmarks\n")
    assert text.count(MARKER) == 1 and "| 10,000 |" in text


def test_the_time_in_the_garbage_collector_is_counted() -> None:
    spent = GcTime()
    gc.callbacks.append(spent)
    try:
        gc.collect(0)
        assert (spent.full, spent.seconds > 0) == (0, True)
        gc.collect()
    finally:
        gc.callbacks.remove(spent)
    assert spent.full == 1


def test_the_authority_with_workers_is_counted_whole() -> None:
    """`ca serve --workers N` forks; its CPU is its workers' too."""
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    try:
        assert family(os.getpid())[0] == os.getpid()
        assert child.pid in family(os.getpid())
        assert child.pid not in family(child.pid)[1:]  # not its own child
        assert family_cpu_seconds(os.getpid()) > 0
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(timeout=10)
    assert child.pid not in family(os.getpid())


def test_workers_get_consecutive_free_metrics_ports() -> None:
    base = free_port_run(3)
    socks = [socket.socket() for _ in range(3)]
    try:
        for i, s in enumerate(socks):
            s.bind(("127.0.0.1", base + i))  # each of the three is free
    finally:
        for s in socks:
            s.close()
