"""The control plane over real TLS on 127.0.0.1: every endpoint, and what it refuses.

The client is the sidecar's own (`sidecar.control.ControlClient`) where the
request is well formed, and a raw TLS stream where it must not be.
"""

from __future__ import annotations

import base64
import contextlib
import json
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import trio
from ca_helpers import TD, Clock, make_csr, snapshot
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ca.authority import Authority
from ca.server import ControlPlane, ServerOptions
from meshid.spiffeid import SpiffeId
from meshid.svid import certs_to_pem, generate_key, key_to_pem, leaf_spiffe_id, verify_svid
from sidecar.control import ClientIdentity, ControlClient, ControlPlaneError
from sidecar.dynamic import build_csr

WEB = SpiffeId(TD, "/web")
API = SpiffeId(TD, "/api")


@dataclass
class Plane:
    server: ControlPlane
    authority: Authority
    state: Path
    port: int
    bundle_pem: bytes
    clock: Clock
    log: list[dict[str, Any]] = field(default_factory=list)

    def client(self) -> ControlClient:
        return ControlClient("127.0.0.1", self.port, TD)

    async def call(
        self,
        method: str,
        target: str,
        body: dict[str, Any] | None = None,
        identity: ClientIdentity | None = None,
    ) -> dict[str, Any]:
        return await self.client().request(
            method, target, body, bundle_pem=self.bundle_pem, now=self.clock(), identity=identity
        )

    def other(self) -> Authority:
        """A second handle on the state, as a CLI command in another process would have."""
        return Authority.open(self.state, clock=self.clock)


@pytest.fixture
async def plane(state: Path, clock: Clock, nursery: trio.Nursery) -> AsyncIterator[Plane]:
    # The server and the test each hold their own connection, as two processes would.
    served = Authority.open(state, clock=clock)
    authority = Authority.open(state, clock=clock)
    log: list[dict[str, Any]] = []
    server = ControlPlane(
        served,
        ServerOptions(host="127.0.0.1", port=0, request_timeout=1.0, poll_interval=0.05),
        log=lambda event, **f: log.append({"event": event, **f}),
        clock=clock,
    )
    async with trio.open_nursery() as own:  # pytest-trio lets a fixture yield in here
        _host, port = await own.start(server.serve)
        yield Plane(server, authority, state, port, authority.bundle().to_pem(), clock, log)
        own.cancel_scope.cancel()
    authority.close()
    served.close()


def write_identity(tmp: Path, authority: Authority, sid: SpiffeId) -> ClientIdentity:
    key = generate_key()
    issued = authority.issue(sid, key.public_key())
    tmp.mkdir(exist_ok=True)
    (tmp / "svid.key").write_bytes(key_to_pem(key))
    (tmp / "svid.pem").write_bytes(certs_to_pem(issued.chain))
    return ClientIdentity(tmp / "svid.pem", tmp / "svid.key")


def csr_pem(sid: SpiffeId = WEB) -> str:
    return build_csr(generate_key(), sid).decode()


async def refused(plane: Plane, *args: Any, **kwargs: Any) -> ControlPlaneError:
    with pytest.raises(ControlPlaneError) as info:
        await plane.call(*args, **kwargs)
    return info.value


# -- raw TLS for requests the sidecar's client would never send --


async def raw_exchange(plane: Plane, data: bytes, *, read_for: float = 5.0) -> bytes:
    ctx = ssl.create_default_context(cadata=plane.bundle_pem.decode())
    ctx.check_hostname = False
    tcp = await trio.open_tcp_stream("127.0.0.1", plane.port)
    stream = trio.SSLStream(tcp, ctx)
    out = bytearray()
    try:
        await stream.send_all(data)
        with trio.move_on_after(read_for):
            while chunk := await stream.receive_some(65536):
                out += chunk
    except (trio.BrokenResourceError, ssl.SSLError):
        pass
    finally:
        await trio.aclose_forcefully(stream)
    return bytes(out)


def status_and_body(raw: bytes) -> tuple[int, dict[str, Any]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ")[1])
    return status, json.loads(body.split(b"\n")[0])


# -- health, bundle, identity --


async def test_health_and_bundle(plane: Plane) -> None:
    health = await plane.call("GET", "/healthz")
    assert health["status"] == "ok" and health["trust_domain"] == "example.org"
    bundle = await plane.call("GET", "/v1/bundle")
    assert bundle["spiffe_sequence"] == 1
    assert [k["use"] for k in bundle["keys"]] == ["x509-svid", "jwt-svid"]


async def test_server_presents_the_authority_identity(plane: Plane) -> None:
    ctx = ssl.create_default_context(cadata=plane.bundle_pem.decode())
    ctx.check_hostname = False
    stream = trio.SSLStream(await trio.open_tcp_stream("127.0.0.1", plane.port), ctx)
    await stream.do_handshake()
    cert = x509.load_der_x509_certificate(stream.getpeercert(binary_form=True) or b"")
    await stream.aclose()
    assert str(leaf_spiffe_id(cert)) == "spiffe://example.org/meshid/authority"
    verify_svid([cert], plane.authority.bundle().roots, plane.clock())


async def test_client_refuses_a_server_with_another_identity(plane: Plane, tmp_path: Path) -> None:
    client = ControlClient("127.0.0.1", plane.port, TD)
    client.expected = API  # as if the sidecar expected someone else at that address
    with pytest.raises(ControlPlaneError) as info:
        await client.request(
            "GET", "/healthz", None, bundle_pem=plane.bundle_pem, now=plane.clock()
        )
    assert info.value.reason == "authority_identity"


async def test_unknown_path_and_wrong_method(plane: Plane) -> None:
    assert (await refused(plane, "GET", "/v1/nothing")).status == 404
    err = await refused(plane, "GET", "/v1/enroll")
    assert (err.status, err.reason) == (405, "method_not_allowed")


# -- enroll --


async def test_enroll_issues_for_the_token_identity_once(plane: Plane) -> None:
    token = plane.authority.create_token(WEB)
    reply = await plane.call("POST", "/v1/enroll", {"token": token, "csr": csr_pem()})
    chain = x509.load_pem_x509_certificates(reply["svid"].encode())
    assert verify_svid(chain, plane.authority.bundle().roots, plane.clock()).spiffe_id == WEB
    assert reply["spiffe_id"] == str(WEB) and reply["bundle_sequence"] == 1

    again = await refused(plane, "POST", "/v1/enroll", {"token": token, "csr": csr_pem()})
    assert (again.status, again.reason) == (401, "token_used")


async def test_enroll_refuses_wrong_and_expired_tokens(plane: Plane) -> None:
    err = await refused(plane, "POST", "/v1/enroll", {"token": "mjt_nope", "csr": csr_pem()})
    assert (err.status, err.reason) == (401, "token_unknown")
    expired = plane.authority.create_token(WEB, ttl=timedelta(0))
    err = await refused(plane, "POST", "/v1/enroll", {"token": expired, "csr": csr_pem()})
    assert (err.status, err.reason) == (401, "token_expired")
    assert "mjt_" not in err.message  # never echo a secret


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{not json", "invalid_json"),
        (b"[1, 2]", "invalid_json"),
        (b'{"token": 5, "csr": "x"}', "invalid_json"),
        (b"\xff\xfe", "invalid_json"),
    ],
)
async def test_enroll_refuses_malformed_json(plane: Plane, body: bytes, reason: str) -> None:
    before = snapshot(plane.state)
    raw = await raw_exchange(
        plane,
        b"POST /v1/enroll HTTP/1.1\r\nhost: ca\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%s" % (len(body), body),
    )
    assert status_and_body(raw) == (
        400,
        {"error": reason, "message": status_and_body(raw)[1]["message"]},
    )
    assert snapshot(plane.state) == before


async def test_bad_csrs_do_not_burn_the_token(plane: Plane) -> None:
    token = plane.authority.create_token(WEB)
    before = snapshot(plane.state)

    err = await refused(
        plane, "POST", "/v1/enroll", {"token": token, "csr": csr_pem(API)}
    )  # a CSR for another ID
    assert (err.status, err.reason) == (403, "csr_identity_mismatch")

    _, der = make_csr()
    broken = bytearray(der)
    broken[-5] ^= 0x01  # inside the signature's last integer
    bad_sig = _pem_csr(bytes(broken))
    err = await refused(plane, "POST", "/v1/enroll", {"token": token, "csr": bad_sig})
    assert err.status == 400 and err.reason in ("bad_csr_signature", "invalid_csr")

    err = await refused(plane, "POST", "/v1/enroll", {"token": token, "csr": "not a csr"})
    assert (err.status, err.reason) == (400, "invalid_csr")
    assert snapshot(plane.state) == before

    reply = await plane.call("POST", "/v1/enroll", {"token": token, "csr": csr_pem()})
    assert reply["spiffe_id"] == str(WEB)


def _pem_csr(der: bytes) -> str:
    body = base64.encodebytes(der).decode().replace("\n", "")
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return "\n".join(
        ["-----BEGIN CERTIFICATE REQUEST-----", *lines, "-----END CERTIFICATE REQUEST-----"]
    )


async def test_huge_body_is_refused_before_it_is_read(plane: Plane) -> None:
    before = snapshot(plane.state)
    raw = await raw_exchange(
        plane,
        b"POST /v1/enroll HTTP/1.1\r\nhost: ca\r\ncontent-length: 10000000\r\n\r\n" + b"x" * 70000,
    )
    assert status_and_body(raw)[0] == 413
    chunked = b"POST /v1/enroll HTTP/1.1\r\nhost: ca\r\ntransfer-encoding: chunked\r\n\r\n"
    chunked += b"".join(b"4000\r\n" + b"y" * 0x4000 + b"\r\n" for _ in range(5))
    raw = await raw_exchange(plane, chunked)
    assert status_and_body(raw)[0] == 413
    assert snapshot(plane.state) == before


async def test_slow_client_gets_408(plane: Plane) -> None:
    # Headers begun, never finished: the request deadline (1 s here) answers.
    with trio.fail_after(10):
        raw = await raw_exchange(plane, b"POST /v1/enroll HTTP/1.1\r\nhost: ca\r\n", read_for=8)
    assert status_and_body(raw) == (
        408,
        {"error": "request_timeout", "message": "request not received in time"},
    )


async def test_garbage_is_refused_and_the_server_carries_on(plane: Plane) -> None:
    raw = await raw_exchange(plane, b"\x00\x01garbage\r\n\r\n")
    assert status_and_body(raw)[0] == 400
    # not even TLS
    tcp = await trio.open_tcp_stream("127.0.0.1", plane.port)
    await tcp.send_all(b"GET / HTTP/1.1\r\n\r\n")
    with trio.fail_after(10):
        while await tcp.receive_some(1024):
            pass
    await tcp.aclose()
    assert (await plane.call("GET", "/healthz"))["status"] == "ok"


async def test_repeated_failures_from_one_source_are_rate_limited(plane: Plane) -> None:
    good = plane.authority.create_token(WEB)
    for _ in range(5):
        err = await refused(plane, "POST", "/v1/enroll", {"token": "mjt_guess", "csr": csr_pem()})
        assert err.status == 401
    err = await refused(plane, "POST", "/v1/enroll", {"token": good, "csr": csr_pem()})
    assert (err.status, err.reason) == (429, "rate_limited")
    assert plane.authority.token_grant(good) is not None  # not consumed while blocked


# -- renew --


async def test_renew_needs_the_current_svid_and_a_new_key(plane: Plane, tmp_path: Path) -> None:
    err = await refused(plane, "POST", "/v1/renew", {"csr": csr_pem()})
    assert (err.status, err.reason) == (401, "no_client_certificate")

    ident = write_identity(tmp_path / "web", plane.authority, WEB)
    old = x509.load_pem_x509_certificate(ident.cert.read_bytes())
    reply = await plane.call("POST", "/v1/renew", {"csr": csr_pem()}, identity=ident)
    new = x509.load_pem_x509_certificate(reply["svid"].encode())
    assert leaf_spiffe_id(new) == WEB and new.serial_number != old.serial_number

    same_key = serialization.load_pem_private_key(ident.key.read_bytes(), None)
    csr = build_csr(same_key, WEB).decode()
    err = await refused(plane, "POST", "/v1/renew", {"csr": csr}, identity=ident)
    assert (err.status, err.reason) == (400, "key_reused")

    err = await refused(plane, "POST", "/v1/renew", {"csr": csr_pem(API)}, identity=ident)
    assert (err.status, err.reason) == (403, "csr_identity_mismatch")


async def test_renew_refused_after_revocation(plane: Plane, tmp_path: Path) -> None:
    ident = write_identity(tmp_path / "web", plane.authority, WEB)
    other = plane.other()
    other.revoke(WEB)
    other.close()
    err = await refused(plane, "POST", "/v1/renew", {"csr": csr_pem()}, identity=ident)
    assert (err.status, err.reason) == (403, "identity_revoked")


async def test_renew_refuses_a_certificate_this_authority_never_issued(
    plane: Plane, tmp_path: Path, clock: Clock
) -> None:
    # Same root key, but the SVID was never recorded (as if minted with a stolen key).
    from meshid.svid import build_svid

    _, root, root_key = plane.authority.signer()
    key = generate_key()
    leaf = build_svid(
        subject_key=key.public_key(),
        spiffe_id=WEB,
        issuer=root,
        issuer_key=root_key,
        now=clock(),
        ttl=timedelta(minutes=5),
    )
    (tmp_path / "k").write_bytes(key_to_pem(key))
    (tmp_path / "c").write_bytes(certs_to_pem([leaf]))
    ident = ClientIdentity(tmp_path / "c", tmp_path / "k")
    err = await refused(plane, "POST", "/v1/renew", {"csr": csr_pem()}, identity=ident)
    assert (err.status, err.reason) == (401, "unknown_certificate")


# -- watch --


async def test_watch_needs_a_client_certificate(plane: Plane) -> None:
    err = await refused(plane, "GET", "/v1/watch")
    assert (err.status, err.reason) == (401, "no_client_certificate")


async def test_watch_answers_at_once_when_behind_and_waits_when_current(
    plane: Plane, tmp_path: Path
) -> None:
    plane.authority.allow(WEB, API)
    ident = write_identity(tmp_path / "web", plane.authority, WEB)
    feed = await plane.call("GET", "/v1/watch", identity=ident)
    assert feed["pairs"] == [[str(WEB), str(API)]]
    versions = (feed["policy_version"], feed["revocation_version"], feed["bundle_sequence"])
    target = "/v1/watch?policy_version={}&revocation_version={}&bundle_sequence={}&wait=20".format(
        *versions
    )
    got: list[dict[str, Any]] = []
    answered = trio.Event()

    async def watch() -> None:
        got.append(
            await plane.client().request(
                "GET",
                target,
                None,
                bundle_pem=plane.bundle_pem,
                now=plane.clock(),
                identity=ident,
                wait=30,
            )
        )
        answered.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        # wait until the watch is parked on the server's change event, then change policy
        with trio.fail_after(10):
            while plane.server._changed.statistics().tasks_waiting == 0:  # noqa: ASYNC110
                await trio.sleep(0.01)
        assert got == []
        other = plane.other()
        other.deny(WEB, API)
        other.close()
        with trio.fail_after(2):
            await answered.wait()
    assert got[0]["policy_version"] == versions[0] + 1 and got[0]["pairs"] == []


async def test_watch_answers_before_the_callers_certificate_expires(
    plane: Plane, clock: Clock, tmp_path: Path
) -> None:
    """A quiet feed is answered (unchanged) while the caller's SVID is still valid, not
    parked past its expiry and then refused as expired."""
    key = generate_key()
    issued = plane.authority.issue(WEB, key.public_key(), ttl=timedelta(seconds=30))
    (tmp_path / "svid.key").write_bytes(key_to_pem(key))
    (tmp_path / "svid.pem").write_bytes(certs_to_pem(issued.chain))
    ident = ClientIdentity(tmp_path / "svid.pem", tmp_path / "svid.key")
    feed = await plane.call("GET", "/v1/watch", identity=ident)
    clock.advance(issued.leaf.not_valid_after_utc - clock() - timedelta(seconds=2))
    target = "/v1/watch?policy_version={}&revocation_version={}&bundle_sequence={}&wait=20".format(
        feed["policy_version"], feed["revocation_version"], feed["bundle_sequence"]
    )
    start = trio.current_time()
    with trio.fail_after(10):
        again = await plane.call("GET", target, identity=ident)
    assert 0.5 < trio.current_time() - start < 5
    assert again["policy_version"] == feed["policy_version"]


async def test_watch_refused_for_a_revoked_identity(plane: Plane, tmp_path: Path) -> None:
    ident = write_identity(tmp_path / "web", plane.authority, WEB)
    plane.authority.revoke(WEB)
    err = await refused(plane, "GET", "/v1/watch", identity=ident)
    assert (err.status, err.reason) == (403, "identity_revoked")
    # the feed is refused to it, so the refusal carries the version it was revoked under
    assert err.revocation_version == 1


async def test_rotation_reissues_the_server_certificate_from_the_new_root(
    plane: Plane, clock: Clock
) -> None:
    other = plane.other()
    generation, _ = other.rotate(timedelta(0))
    other.close()
    with trio.fail_after(10):
        # polling the server's state, with a deadline
        while plane.server._creds is None or plane.server._creds.generation != generation:  # noqa: ASYNC110
            await trio.sleep(0.05)
    bundle = plane.authority.bundle()
    assert len(bundle.roots) == 2
    # a client that has heard of both roots still talks to it
    health = await plane.client().request(
        "GET", "/healthz", None, bundle_pem=bundle.to_pem(), now=clock()
    )
    assert health["bundle_sequence"] == bundle.sequence


def test_reserved_identities_cannot_be_granted(authority: Authority) -> None:
    from meshid.errors import InvalidInput

    with pytest.raises(InvalidInput, match="reserved"):
        authority.create_token(SpiffeId(TD, "/meshid/authority"))
    with pytest.raises(InvalidInput, match="reserved"):
        authority.issue(SpiffeId(TD, "/meshid/x"), generate_key().public_key())


async def test_renewal_leaves_out_a_bundle_the_caller_already_holds(
    plane: Plane, tmp_path: Path
) -> None:
    ident = write_identity(tmp_path / "web", plane.authority, WEB)
    held = await plane.call(
        "POST", "/v1/renew", {"csr": csr_pem(), "bundle_sequence": 1}, identity=ident
    )
    assert "bundle" not in held and held["bundle_sequence"] == 1
    stale = await plane.call(
        "POST", "/v1/renew", {"csr": csr_pem(), "bundle_sequence": 0}, identity=ident
    )
    assert stale["bundle"] == plane.authority.bundle().to_pem().decode()


async def test_enrollment_and_renewal_log_lines_name_the_identity(
    plane: Plane, tmp_path: Path
) -> None:
    token = plane.authority.create_token(WEB)
    reply = await plane.call("POST", "/v1/enroll", {"token": token, "csr": csr_pem()})
    (enrolled,) = [e for e in plane.log if e["event"] == "request" and e["status"] == 200]
    assert enrolled["path"] == "/v1/enroll" and enrolled["spiffe_id"] == str(WEB)
    assert enrolled["serial"] == reply["serial"]
    assert token not in json.dumps(plane.log)  # never the token
    assert "instance" not in enrolled  # an embedded authority is the one unnamed instance
    # a renewal is one line too, with the serial it issued
    ident = write_identity(tmp_path / "web", plane.authority, WEB)
    renewed = await plane.call("POST", "/v1/renew", {"csr": csr_pem()}, identity=ident)
    (line,) = [e for e in plane.log if e["event"] == "request" and e["path"] == "/v1/renew"]
    assert (line["status"], line["spiffe_id"], line["serial"]) == (200, str(WEB), renewed["serial"])
    # a failed renewal says whose it was
    await refused(plane, "POST", "/v1/renew", {"csr": csr_pem(API)}, identity=ident)
    failed = [e for e in plane.log if e["event"] == "request" and e["path"] == "/v1/renew"][-1]
    assert failed["status"] == 403 and failed["spiffe_id"] == str(WEB)
    # and an anonymous failure names nobody
    await refused(plane, "POST", "/v1/enroll", {"token": "mjt_wrong", "csr": csr_pem()})
    assert plane.log[-1].get("spiffe_id") is None and plane.log[-1]["status"] == 401


# -- JWT-SVIDs ----------------------------------------------------------------


async def test_jwt_svid_for_the_caller_only(plane: Plane, tmp_path: Path) -> None:
    import jwt as pyjwt

    body = {"spiffe_id": str(WEB), "audience": ["db"]}
    err = await refused(plane, "POST", "/v1/jwt-svid", body)
    assert (err.status, err.reason) == (401, "no_client_certificate")
    ident = write_identity(tmp_path / "web", plane.authority, WEB)
    reply = await plane.call("POST", "/v1/jwt-svid", body, identity=ident)
    bundle = await plane.call("GET", "/v1/bundle")
    keys = {k["kid"]: k for k in bundle["keys"] if k["use"] == "jwt-svid"}
    header = pyjwt.get_unverified_header(reply["token"])
    claims = pyjwt.decode(
        reply["token"],
        pyjwt.PyJWK(keys[header["kid"]]).key,
        algorithms=["ES256"],
        audience="db",
        options={"verify_exp": False},  # the plane's clock is the test's, not the wall's
    )
    assert claims["sub"] == str(WEB) and claims["exp"] == reply["expires_at"]
    err = await refused(
        plane, "POST", "/v1/jwt-svid", {**body, "spiffe_id": str(API)}, identity=ident
    )
    assert (err.status, err.reason) == (403, "csr_identity_mismatch")
    err = await refused(plane, "POST", "/v1/jwt-svid", {**body, "audience": []}, identity=ident)
    assert err.status == 400
    many = {**body, "audience": [f"a{i}" for i in range(17)]}
    err = await refused(plane, "POST", "/v1/jwt-svid", many, identity=ident)
    assert err.status == 400
    other = plane.other()
    other.revoke(WEB)
    other.close()
    err = await refused(plane, "POST", "/v1/jwt-svid", body, identity=ident)
    assert (err.status, err.reason) == (403, "identity_revoked")


async def test_a_report_over_tls_is_judged_against_the_request_window(
    plane: Plane, tmp_path: Path
) -> None:
    """The shell stamps when a request began to arrive; the skew is measured from there."""
    ident = write_identity(tmp_path / "web", plane.authority, SpiffeId(TD, "/web"))
    ahead = (plane.clock.now + timedelta(minutes=10)).isoformat()
    await plane.call("POST", "/v1/report", {"v": 1, "instance": "w1", "sent_at": ahead}, ident)
    in_sync = plane.clock.now.isoformat()
    await plane.call("POST", "/v1/report", {"v": 1, "instance": "w2", "sent_at": in_sync}, ident)
    skews = {entry.instance: entry.skew for entry in plane.authority.reports()[0]}
    assert skews == {"w1": 600.0, "w2": 0.0}
    health = await plane.call("GET", "/healthz")
    assert health["time"] == plane.clock.now.isoformat()


def _db_calls(plane: Plane) -> float:
    """Database calls so far: the count of the histogram that times them."""
    return sum(
        s.value
        for m in plane.server.metrics.db_seconds.collect()
        for s in m.samples
        if s.name.endswith("_count")
    )


async def test_watches_parked_again_after_a_change_are_checked_together(
    plane: Plane, tmp_path: Path
) -> None:
    """After a change every sidecar parks its next watch at once; those watches are
    checked (caller, versions) in a few database calls, not one each: with one per
    watch, the re-parking fleet queued in front of the feeds still to be sent."""
    watchers = 40
    ids = [SpiffeId(TD, f"/r{i}") for i in range(watchers)]
    for i, sid in enumerate(ids):
        plane.authority.allow(sid, ids[(i + 1) % watchers])
    idents = [write_identity(tmp_path / f"r{i}", plane.authority, sid) for i, sid in enumerate(ids)]
    first = await plane.call("GET", "/v1/watch", identity=idents[0])
    query = "/v1/watch?policy_version={}&revocation_version={}&bundle_sequence={}&wait=20"
    parked_again = 0
    woken = trio.Event()
    calls_before = 0.0

    async def watch(i: int) -> None:
        nonlocal parked_again
        client = ControlClient("127.0.0.1", plane.port, TD, pool_size=1)  # as a sidecar keeps it
        feed = first
        for _ in range(2):
            target = query.format(
                feed["policy_version"], feed["revocation_version"], feed["bundle_sequence"]
            )
            if feed is not first:
                parked_again += 1
            with contextlib.suppress(trio.TooSlowError):
                feed = await client.request(
                    "GET",
                    target,
                    None,
                    bundle_pem=plane.bundle_pem,
                    now=plane.clock(),
                    identity=idents[i],
                    wait=30,
                )
            if feed["policy_version"] > first["policy_version"]:
                await woken.wait()  # every one got its feed: now all park again at once
        client.drop()

    async with trio.open_nursery() as nursery:
        for i in range(watchers):
            nursery.start_soon(watch, i)
        with trio.fail_after(20):
            while plane.server._watching < watchers:  # noqa: ASYNC110
                await trio.sleep(0.01)
        other = plane.other()
        other.deny(ids[0], ids[1])
        other.close()
        with trio.fail_after(20):
            while plane.server._watching > 0:  # noqa: ASYNC110
                await trio.sleep(0.01)
        calls_before = _db_calls(plane)
        woken.set()
        with trio.fail_after(20):
            while plane.server._watching < watchers:  # noqa: ASYNC110
                await trio.sleep(0.01)
        calls = _db_calls(plane) - calls_before
        nursery.cancel_scope.cancel()
    assert parked_again == watchers
    assert calls < watchers / 2, calls


async def test_watchers_woken_together_are_answered_together(plane: Plane, tmp_path: Path) -> None:
    """One change wakes every parked watch; their feeds are read in a few database calls,
    not one each (each call is a trip to the database thread), and each caller still gets
    its own feed."""
    watchers = 40
    ids = [SpiffeId(TD, f"/w{i}") for i in range(watchers)]
    for i, sid in enumerate(ids):
        plane.authority.allow(sid, ids[(i + 1) % watchers])
    idents = [write_identity(tmp_path / f"w{i}", plane.authority, sid) for i, sid in enumerate(ids)]
    first = await plane.call("GET", "/v1/watch", identity=idents[0])
    target = "/v1/watch?policy_version={}&revocation_version={}&bundle_sequence={}&wait=20".format(
        first["policy_version"], first["revocation_version"], first["bundle_sequence"]
    )
    got: dict[int, dict[str, Any]] = {}

    async def watch(i: int) -> None:
        got[i] = await plane.client().request(
            "GET",
            target,
            None,
            bundle_pem=plane.bundle_pem,
            now=plane.clock(),
            identity=idents[i],
            wait=30,
        )

    async with trio.open_nursery() as nursery:
        for i in range(watchers):
            nursery.start_soon(watch, i)
        with trio.fail_after(20):
            while plane.server._watching < watchers:  # noqa: ASYNC110
                await trio.sleep(0.01)
        before = _db_calls(plane)
        other = plane.other()
        other.deny(ids[0], ids[1])
        other.close()
    calls = _db_calls(plane) - before
    assert calls < watchers / 2, calls
    assert len(got) == watchers
    for i, feed in got.items():
        assert feed["policy_version"] == first["policy_version"] + 1
        mine = {tuple(p) for p in feed["pairs"]}
        assert all(str(ids[i]) in pair for pair in mine)
        expected = {(str(ids[i]), str(ids[(i + 1) % watchers])), (str(ids[i - 1]), str(ids[i]))}
        assert mine == expected - {(str(ids[0]), str(ids[1]))}
