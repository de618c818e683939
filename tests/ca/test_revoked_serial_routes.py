"""An SVID revoked by its serial (`ca revoke --serial`) is refused on every authenticated route.

The identity is not revoked: another, newer SVID of it is still served. Real
TLS on 127.0.0.1, the sidecar's own client, certificates from our issuer.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
from ca_helpers import TD, Clock
from cryptography import x509
from test_server import Plane, csr_pem, write_identity
from test_server_abuse import serving

from meshid.spiffeid import SpiffeId
from sidecar.control import ClientIdentity, ControlPlaneError

WEB = SpiffeId(TD, "/web")
API = SpiffeId(TD, "/api")
ALICE = SpiffeId(TD, "/meshid/operator/alice")

# Every route that authenticates its caller by its SVID, with a body it accepts.
WORKLOAD_ROUTES: list[tuple[str, str, dict[str, Any] | None]] = [
    ("GET", "/v1/watch", None),
    ("POST", "/v1/report", {"v": 1, "instance": "w1"}),
    ("POST", "/v1/jwt-svid", {"v": 1, "spiffe_id": str(WEB), "audience": ["db"]}),
]
OPERATOR_ROUTES: list[tuple[str, str, dict[str, Any] | None]] = [
    ("POST", "/v1/admin/policy", {"action": "check", "from": "/web", "to": "/api"}),
    ("POST", "/v1/admin/revoke", {"spiffe_id": "/old"}),
    ("POST", "/v1/admin/run", {"command": ["policy", "list"], "args": [], "files": []}),
]


@pytest.fixture
async def plane(state: Path, clock: Clock) -> AsyncIterator[Plane]:
    async with serving(state, clock) as p:
        yield p


def _serial(ident: ClientIdentity) -> int:
    return x509.load_pem_x509_certificates(ident.cert.read_bytes())[0].serial_number


async def _refusal(plane: Plane, *args: Any, **kwargs: Any) -> ControlPlaneError:
    with pytest.raises(ControlPlaneError) as info:
        await plane.call(*args, **kwargs)
    return info.value


def _revoke_serial(plane: Plane, ident: ClientIdentity) -> int:
    other = plane.other()
    try:
        return other.revoke_serial(f"{_serial(ident):x}")[1]
    finally:
        other.close()


async def test_a_revoked_serial_is_refused_on_every_workload_route(
    plane: Plane, tmp_path: Path
) -> None:
    revoked = write_identity(tmp_path / "old", plane.authority, WEB)
    newer = write_identity(tmp_path / "new", plane.authority, WEB)
    version = _revoke_serial(plane, revoked)
    for method, target, body in [*WORKLOAD_ROUTES, ("POST", "/v1/renew", {"csr": csr_pem()})]:
        err = await _refusal(plane, method, target, body, identity=revoked)
        assert (err.status, err.reason) == (403, "identity_revoked"), target
        assert err.revocation_version == version, target
        # the SVID is named, so its holder can tell it from a revoked identity
        assert err.revoked_serial == _serial(revoked), target
        assert "mjt_" not in err.message and "\n" not in err.message
        # the identity lives on: its newer SVID is served on the same route
        await plane.call(method, target, body, identity=newer)
    renewed = await plane.call("POST", "/v1/renew", {"csr": csr_pem()}, identity=newer)
    assert renewed["spiffe_id"] == str(WEB)


async def test_a_revoked_serial_is_refused_on_every_operator_route(
    plane: Plane, tmp_path: Path
) -> None:
    plane.authority.operator_add(ALICE)
    revoked = write_identity(tmp_path / "old", plane.authority, ALICE)
    newer = write_identity(tmp_path / "new", plane.authority, ALICE)
    _revoke_serial(plane, revoked)
    before = len(plane.authority.store.audit_entries())
    for method, target, body in OPERATOR_ROUTES:
        err = await _refusal(plane, method, target, body, identity=revoked)
        assert (err.status, err.reason, err.revoked_serial) == (
            403,
            "identity_revoked",
            _serial(revoked),
        ), target
    # refused before any operator call was audited as made
    assert len(plane.authority.store.audit_entries()) == before
    answer = await plane.call(*OPERATOR_ROUTES[0], identity=newer)
    assert answer["ok"] is False  # a check of a pair not allowed, answered
    answer = await plane.call(*OPERATOR_ROUTES[1], identity=newer)
    assert answer["ok"] is True


async def test_a_parked_watch_of_a_serial_being_revoked_is_refused(
    plane: Plane, tmp_path: Path
) -> None:
    ident = write_identity(tmp_path / "web", plane.authority, WEB)
    feed = await plane.call("GET", "/v1/watch", identity=ident)
    target = "/v1/watch?policy_version={}&revocation_version={}&bundle_sequence={}&wait=20".format(
        feed["policy_version"], feed["revocation_version"], feed["bundle_sequence"]
    )
    got: list[ControlPlaneError] = []

    async def watch() -> None:
        got.append(await _refusal(plane, "GET", target, identity=ident))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            while plane.server._changed.statistics().tasks_waiting == 0:  # noqa: ASYNC110
                await trio.sleep(0.01)
            _revoke_serial(plane, ident)
    assert (got[0].reason, got[0].revoked_serial) == ("identity_revoked", _serial(ident))
