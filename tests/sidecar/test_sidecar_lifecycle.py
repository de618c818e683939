"""Admin endpoints, draining, and the real CLI stopping on SIGTERM."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import trio
from sidecar_helpers import (
    API,
    WEB,
    Addr,
    Backend,
    client_context,
    connect,
    read_events,
    receive_all,
    receive_exactly,
    roundtrip,
    running_cli,
    tls_connect,
    wait_cut,
    wait_event,
)
from sidecar_mesh import Mesh, Pair, Pki, start_pair, write_static_config


async def http(addr: Addr, method: str, path: str) -> tuple[int, bytes]:
    stream = await connect(addr)
    async with stream:
        request = f"{method} {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n"
        await stream.send_all(request.encode())
        raw = await receive_all(stream, limit=1 << 20)
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


async def test_admin_endpoints(pair: Pair) -> None:
    with trio.fail_after(20):
        assert await roundtrip(pair.app, b"counted") == b"counted"
        await pair.api.log.wait_for("close")
        admin = pair.api.admin
        assert await http(admin, "GET", "/healthz") == (200, b"ok\n")
        assert await http(admin, "GET", "/readyz") == (200, b"ready\n")
        status, body = await http(admin, "GET", "/svid")
        assert status == 200
        svid = json.loads(body)
        status, metrics = await http(admin, "GET", "/metrics")
        assert status == 200
        assert (await http(admin, "GET", "/nope"))[0] == 404
        assert (await http(admin, "POST", "/metrics"))[0] == 405
    assert svid["spiffe_id"] == API
    assert svid["policy_version"] == 1
    assert 3000 < svid["seconds_left"] <= 3600
    text = metrics.decode()
    assert (
        'meshid_connections_total{decision="allow",direction="inbound",reason="allowed"} 1.0'
        in text
    )
    assert 'meshid_bytes_total{direction="inbound",flow="in"} 7.0' in text
    assert "meshid_svid_expiry_seconds" in text
    assert "meshid_policy_version 1.0" in text


async def test_drain_lets_live_connections_finish(pair: Pair) -> None:
    api = pair.api
    with trio.fail_after(20):
        live = await connect(pair.app)
        async with live:
            await live.send_all(b"before")
            assert await receive_exactly(live, 6) == b"before"
            api.sidecar.request_drain()
            [draining] = await api.log.wait_for("draining")
            # No longer ready, no longer accepting...
            assert (await http(api.admin, "GET", "/readyz"))[0] == 503
            with pytest.raises(OSError):
                await connect(api.inbound)
            # ...but the live connection goes on until its app is done.
            await live.send_all(b"after")
            assert await receive_exactly(live, 5) == b"after"
            assert not api.sidecar.stopped.is_set()
            await live.send_eof()
            assert await receive_all(live) == b""
        await api.sidecar.stopped.wait()
    assert draining["live_connections"] == 1
    [stopped] = api.log.find("stopped")
    assert (stopped["drained"], stopped["cut"]) == (1, 0)
    [close] = api.log.find("close")
    assert close["reason"] == "closed"


async def test_drain_timeout_cuts_what_is_left(mesh: Mesh, backend: Backend) -> None:
    pair = await start_pair(mesh, backend, api_limits={"drain_timeout": 0.3})
    api = pair.api
    with trio.fail_after(20):
        live = await connect(pair.app)
        async with live:
            await live.send_all(b"hold")
            assert await receive_exactly(live, 4) == b"hold"
            api.sidecar.request_drain()
            assert await wait_cut(live) == b""
        await api.sidecar.stopped.wait()
    [stopped] = api.log.find("stopped")
    assert (stopped["drained"], stopped["cut"]) == (0, 1)
    [close] = api.log.find("close")
    assert close["reason"] == "drain_timeout"


async def test_cli_drains_on_sigterm_and_exits_0(
    backend: Backend, pki: Pki, tmp_path: Path
) -> None:
    config = write_static_config(tmp_path, pki, backend.addr)
    log = tmp_path / "events.jsonl"
    async with running_cli(config, tmp_path / "stderr.txt") as proc:
        with trio.fail_after(60):
            started = await wait_event(log, "started")
            host, port = started["listeners"]["inbound[0]"].rsplit(":", 1)
            inbound = (host, int(port))
            ctx = client_context(tmp_path, pki.bundle_pem, pki.issue("web"))
            live = await tls_connect(inbound, ctx)
            async with live:
                await live.send_all(b"before")
                assert await live.receive_some(100) == b"before"
                proc.send_signal(signal.SIGTERM)
                await wait_event(log, "draining")
                with pytest.raises(OSError):
                    await connect(inbound)  # no longer accepting
                await live.send_all(b"after")
                assert await live.receive_some(100) == b"after"
                assert proc.poll() is None  # still serving the live connection
            returncode = await proc.wait()
    assert returncode == 0, (tmp_path / "stderr.txt").read_text()
    events = read_events(log)
    names = [e["event"] for e in events]
    assert names.index("started") < names.index("signal") < names.index("stopped")
    [sig] = [e for e in events if e["event"] == "signal"]
    assert sig["signal"] == "SIGTERM"
    [stopped] = [e for e in events if e["event"] == "stopped"]
    assert (stopped["drained"], stopped["cut"]) == (1, 0)
    [allow] = [e for e in events if e["event"] == "decision"]
    assert allow["decision"] == "allow" and allow["peer_id"] == WEB
    [close] = [e for e in events if e["event"] == "close"]
    assert close["reason"] == "closed" and close["bytes_in"] == 11
    assert (tmp_path / "stderr.txt").read_text() == ""
