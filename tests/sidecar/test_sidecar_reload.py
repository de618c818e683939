"""Static mode reloads: new credentials reach new connections only; a broken reload changes nothing.

The sidecars poll their files every 50 ms here. Files are swapped with
os.replace in one synchronous step, so no poll sees a mixture of old and new
unless the test means it to.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta

import pytest
import trio
from sidecar_helpers import metric, receive_exactly, roundtrip, sid, utcnow
from sidecar_mesh import Pair, Pki, Running


def _svid_serial(side: Running) -> str:
    response = side.sidecar.route("GET", "/svid")
    assert response.status == 200
    return str(json.loads(response.body)["serial"])


async def _echo(stream: trio.SocketStream, data: bytes) -> None:
    await stream.send_all(data)
    assert await receive_exactly(stream, len(data)) == data


@pytest.mark.parametrize("side", ["web", "api"])
async def test_new_credentials_reach_new_connections_only(side: str, pair: Pair, pki: Pki) -> None:
    renewed, peer = (pair.web, pair.api) if side == "web" else (pair.api, pair.web)
    old = _svid_serial(renewed)
    fresh = pki.issue(side)
    with trio.fail_after(20):
        live = await trio.open_tcp_stream(*pair.app)
        async with live:
            await _echo(live, b"before")
            renewed.write_creds(fresh)
            [loaded] = await renewed.log.wait_for("credentials", generation=2)
            assert await roundtrip(pair.app, b"new") == b"new"
            # The live connection keeps the credentials it started with, and keeps working.
            await _echo(live, b"after")
        closes = await peer.log.wait_for("close", count=2)
    assert loaded["serial"] == fresh.serial
    assert _svid_serial(renewed) == fresh.serial != old
    allows = peer.log.find("decision", decision="allow")
    # Each peer saw the certificate current when its connection began.
    assert [a["peer_serial"] for a in allows] == [old, fresh.serial]
    assert {c["reason"] for c in closes} == {"closed"}
    assert metric(renewed.sidecar, "meshid_svid_renewals_total", result="ok") == 2


def _half_written(pki: Pki, name: str) -> tuple[bytes, bytes]:
    new = pki.issue(name)
    pem = new.cert_pem()
    return pem[: len(pem) // 2], new.key_pem()


def _key_mismatch(pki: Pki, name: str) -> tuple[bytes, bytes]:
    return pki.issue(name).cert_pem(), pki.issue(name).key_pem()


def _expired(pki: Pki, name: str) -> tuple[bytes, bytes]:
    now = utcnow()
    hour = timedelta(hours=1)
    old = pki.forge(sid(name), not_before=now - 2 * hour, not_after=now - hour)
    return old.cert_pem(), old.key_pem()


def _someone_else(pki: Pki, name: str) -> tuple[bytes, bytes]:
    other = pki.issue("mallory")
    return other.cert_pem(), other.key_pem()


BROKEN: dict[str, tuple[Callable[[Pki, str], tuple[bytes, bytes]], str]] = {
    "half_written_certificate": (_half_written, "invalid_pem"),
    "key_not_matching": (_key_mismatch, "key_mismatch"),
    "expired_certificate": (_expired, "expired"),
    "another_identity": (_someone_else, "wrong_identity"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
async def test_broken_reload_keeps_the_previous_credentials(
    case: str, pair: Pair, pki: Pki
) -> None:
    make, reason = BROKEN[case]
    web = pair.web
    old = _svid_serial(web)
    cert_pem, key_pem = make(pki, "web")
    with trio.fail_after(20):
        live = await trio.open_tcp_stream(*pair.app)
        async with live:
            await _echo(live, b"before")
            web.write_file("svid.pem", cert_pem)
            web.write_file("svid.key", key_pem)
            [failed] = await web.log.wait_for("reload_failed")
            assert await roundtrip(pair.app, b"new") == b"new"
            await _echo(live, b"after")
        await pair.api.log.wait_for("close", count=2)
        # A good write afterwards is picked up: the watcher is still alive.
        fresh = pki.issue("web")
        web.write_creds(fresh)
        await web.log.wait_for("credentials", generation=2)
    assert failed["reason"] == reason, failed
    assert failed["keeping_serial"] == old
    allows = pair.api.log.find("decision", decision="allow")
    assert [a["peer_serial"] for a in allows] == [old, old]
    assert len(web.log.find("credentials")) == 2  # the initial load, then the good write
    assert _svid_serial(web) == fresh.serial
    assert metric(web.sidecar, "meshid_svid_renewals_total", result="error") == 1
