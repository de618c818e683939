"""The sidecar's /metrics over its real admin listener: process, build and latency metrics."""

from __future__ import annotations

import trio
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sidecar_helpers import connect, receive_all, roundtrip
from sidecar_mesh import Pair

from meshid.version import VERSION
from sidecar.metrics import _remember_children


async def _scrape(
    pair_admin: tuple[str, int],
) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    stream = await connect(pair_admin)
    await stream.send_all(b"GET /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    raw = await receive_all(stream)
    await stream.aclose()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    assert f"server: meshid/{VERSION}".encode() in head.lower()
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            key = tuple(sorted(sample.labels.items()))
            samples.setdefault(sample.name, {})[key] = float(sample.value)
    return samples


async def test_metrics_carry_process_build_and_latency_after_one_connection(pair: Pair) -> None:
    with trio.fail_after(20):
        assert await roundtrip(pair.app, b"hello api") == b"hello api"
        await pair.api.log.wait_for("close", direction="inbound")
        await pair.web.log.wait_for("close", direction="outbound")
        api = await _scrape(pair.api.admin)
        web = await _scrape(pair.web.admin)
    assert [line["version"] for line in pair.api.log.find("started")] == [VERSION]
    for samples in (api, web):
        assert samples["meshid_build_info"] == {
            (("component", "sidecar"), ("version", VERSION)): 1.0
        }
        assert samples["process_resident_memory_bytes"][()] > 0
        assert samples["process_open_fds"][()] > 0
        assert samples["meshid_ready"][()] == 1
    # One handshake and one connect on each side: the inbound side dialled the app,
    # the outbound side the upstream sidecar.
    inbound = (("direction", "inbound"),)
    outbound = (("direction", "outbound"),)
    assert api["meshid_handshake_seconds_count"][inbound] == 1
    assert api["meshid_connect_seconds_count"][inbound] == 1
    assert web["meshid_handshake_seconds_count"][outbound] == 1
    assert web["meshid_connect_seconds_count"][outbound] == 1
    assert 0 < web["meshid_handshake_seconds_sum"][outbound] < 20


def test_remembered_children_are_the_series_labels_would_give() -> None:
    registry = CollectorRegistry()
    counter = _remember_children(Counter("c", "doc", ["direction", "reason"], registry=registry))
    first = counter.labels("inbound", "allowed")
    assert counter.labels("inbound", "allowed") is first
    first.inc()
    counter.labels("inbound", "not_allowed").inc(2)
    counter.labels(direction="inbound", reason="allowed").inc()  # named: the long way, same child
    text = generate_latest(registry).decode()
    assert 'c_total{direction="inbound",reason="allowed"} 2.0' in text
    assert 'c_total{direction="inbound",reason="not_allowed"} 2.0' in text
