"""The Workload API of an enrolled sidecar: our authority in this process, py-spiffe as the client.

X.509 from an enrolled sidecar, a renewal (triggered directly, no waiting for
half-life) reaching an open stream, and JWT-SVIDs: minted by the authority
over the sidecar's mTLS session, verified against the key `meshid ca bundle
--format spiffe` prints, validated (and refused) by `ValidateJWTSVID`.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import grpc
import jwt
import pytest
import trio
from sidecar_helpers import MESHID, TD, LogCapture, fmt, utcnow
from spiffe import JwtSource, SpiffeId, WorkloadApiClient
from spiffe.workloadapi.errors import ValidateJwtSvidError
from workload_helpers import raw_call, short_dir

from ca.authority import Authority
from ca.server import ControlPlane, ServerOptions
from meshid.clock import ManualClock, system_clock
from meshid.events import EventLog
from meshid.jwtsvid import claims, sign
from meshid.spiffeid import SpiffeId as MeshSpiffeId
from sidecar.app import Sidecar
from sidecar.config import parse_config
from sidecar.dynamic import Pacing
from sidecar.schedule import Schedule
from sidecar.workload.proto import ValidateJwtSvidRequest

WEB = MeshSpiffeId(TD, "/web")


@dataclass
class Enrolled:
    sidecar: Sidecar
    log: LogCapture
    authority: Authority
    state: Path
    socket: Path

    @property
    def endpoint(self) -> str:
        return f"unix://{self.socket}"


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    with short_dir() as path:
        yield path


@pytest.fixture
async def enrolled(tmp_path: Path, sock_dir: Path) -> AsyncIterator[Enrolled]:
    state = tmp_path / "authority"
    born = utcnow() - timedelta(days=1)
    Authority.init(state, TD, clock=ManualClock(born)).close()
    authority = Authority.open(state, clock=system_clock())
    config_dir = tmp_path / "web"
    config_dir.mkdir()
    (config_dir / "bundle.pem").write_bytes(authority.bundle().to_pem())
    (config_dir / "token").write_text(authority.create_token(WEB))
    plane = ControlPlane(
        authority,
        ServerOptions(host="127.0.0.1", port=0, poll_interval=0.05, request_timeout=5.0),
        log=lambda event, **fields: None,
        clock=system_clock(),
    )
    log = LogCapture()
    sock = sock_dir / "api.sock"
    async with trio.open_nursery() as nursery:
        addr = await nursery.start(plane.serve)
        doc = {
            "identity": "web",
            "trust_domain": TD.name,
            "authority": {
                "server": fmt(addr),
                "bundle": "bundle.pem",
                "token_file": "token",
                "state_dir": str(tmp_path / "state"),
            },
            "workload_api": {"socket": str(sock), "allow_uids": [os.getuid()]},
        }
        sidecar = Sidecar(
            parse_config(doc, config_dir),
            events=EventLog(log),
            pacing=Pacing(schedule=Schedule(backoff_initial=0.02, backoff_max=0.05)),
        )
        with trio.fail_after(20):
            await nursery.start(sidecar.run)
        yield Enrolled(sidecar, log, authority, state, sock)
        nursery.cancel_scope.cancel()
    authority.close()


async def test_enrolled_sidecar_serves_x509_and_a_renewal_reaches_the_stream(
    enrolled: Enrolled,
) -> None:
    token = trio.lowlevel.current_trio_token()
    send, receive = trio.open_memory_channel[int](10)
    client = WorkloadApiClient(enrolled.endpoint)

    def on_success(ctx) -> None:  # type: ignore[no-untyped-def]
        serial = ctx.default_svid.leaf.serial_number
        trio.from_thread.run_sync(send.send_nowait, serial, trio_token=token)

    handle = client.stream_x509_contexts(on_success, lambda e: None, retry_connect=False)
    try:
        with trio.fail_after(20):
            first = await receive.receive()
            assert first == enrolled.sidecar.current_svid().serial  # type: ignore[union-attr]
            assert enrolled.sidecar.dynamic is not None
            await enrolled.sidecar.dynamic.renew()  # what the renewer does at half-life
            second = await receive.receive()
        assert second != first
        assert second == enrolled.sidecar.current_svid().serial  # type: ignore[union-attr]
    finally:
        handle.cancel()
        client.close()


def _spiffe_bundle(state: Path) -> dict[str, object]:
    done = subprocess.run(
        [str(MESHID), "ca", "bundle", "--state", str(state), "--format", "spiffe"],
        capture_output=True,
        check=True,
        timeout=60,
    )
    return json.loads(done.stdout)  # type: ignore[no-any-return]


async def test_jwt_svid_verifies_against_the_published_bundle(enrolled: Enrolled) -> None:
    def fetch() -> str:
        source = JwtSource(socket_path=enrolled.endpoint, timeout_in_seconds=10)
        try:
            svid = source.fetch_svid({"db", "cache"})
            bundle = source.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
            assert bundle is not None and bundle.jwt_authorities
            return svid.token
        finally:
            source.close()

    with trio.fail_after(20):
        token = await trio.to_thread.run_sync(fetch)
        bundle = await trio.to_thread.run_sync(_spiffe_bundle, enrolled.state)
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "ES256"
    entries = [k for k in bundle["keys"] if k.get("use") == "jwt-svid"]  # type: ignore[attr-defined]
    key = next(k for k in entries if k["kid"] == header["kid"])
    verified = jwt.decode(token, jwt.PyJWK(key).key, algorithms=["ES256"], audience="db", leeway=5)
    assert verified["sub"] == str(WEB)
    assert sorted(verified["aud"]) == ["cache", "db"]
    assert 0 < verified["exp"] - verified["iat"] <= 300
    # the X.509 roots are in the same bundle
    assert any(k.get("use") == "x509-svid" for k in bundle["keys"])  # type: ignore[attr-defined]


async def test_validate_jwt_svid_accepts_and_refuses(enrolled: Enrolled) -> None:
    def run() -> dict[str, object]:
        results: dict[str, object] = {}
        with WorkloadApiClient(enrolled.endpoint) as client:
            svid = client.fetch_jwt_svid({"db"})
            token = svid.token
            results["ok"] = str(client.validate_jwt_svid(token, "db").spiffe_id)
            for name, bad, audience in (
                ("audience", token, "other"),
                ("tampered", token[:-4] + ("AAAA" if token[-4:] != "AAAA" else "BBBB"), "db"),
            ):
                try:
                    client.validate_jwt_svid(bad, audience)
                    results[name] = "accepted"
                except ValidateJwtSvidError as exc:
                    results[name] = str(exc)
        return results

    with trio.fail_after(20):
        results = await trio.to_thread.run_sync(run)
    assert results["ok"] == str(WEB)
    assert "audience" in str(results["audience"])
    assert "signature" in str(results["tampered"]) or "not a JWT" in str(results["tampered"])

    # An expired token, signed by the authority's real key: refused for its exp alone.
    from ca.jwtkeys import JwtKeyring

    key = JwtKeyring(enrolled.state, utcnow).signing_key()
    old = sign(claims(WEB, ["db"], utcnow() - timedelta(minutes=10)), key.key, key.kid)
    fresh = sign(claims(WEB, ["db"], utcnow()), key.key, key.kid)
    for token, expected in ((old, "expired"), (fresh, None)):
        request = ValidateJwtSvidRequest("db", token).encode()
        if expected is None:
            replies = await trio.to_thread.run_sync(
                lambda r=request: raw_call(enrolled.socket, "ValidateJWTSVID", r)
            )
            assert str(WEB).encode() in replies[0]  # the response's spiffe_id
            continue
        with pytest.raises(grpc.RpcError) as caught:
            await trio.to_thread.run_sync(
                lambda r=request: raw_call(enrolled.socket, "ValidateJWTSVID", r)
            )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert expected in caught.value.details()


async def test_jwt_for_another_id_is_refused(enrolled: Enrolled) -> None:
    def run() -> grpc.StatusCode:
        with WorkloadApiClient(enrolled.endpoint) as client:
            try:
                client.fetch_jwt_svid({"db"}, subject=SpiffeId("spiffe://example.org/api"))
            except Exception as exc:  # py-spiffe wraps the gRPC error
                assert "PERMISSION_DENIED" in str(exc) or "serves" in str(exc), exc
                return grpc.StatusCode.PERMISSION_DENIED
        return grpc.StatusCode.OK

    with trio.fail_after(20):
        assert await trio.to_thread.run_sync(run) == grpc.StatusCode.PERMISSION_DENIED


# -- the CLI ------------------------------------------------------------------------


async def _meshid(
    *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    return await trio.run_process(
        [str(MESHID), *args],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env={**os.environ, **(env or {})},
    )


async def test_cli_fetch_x509_and_jwt_and_validate(enrolled: Enrolled, tmp_path: Path) -> None:
    env = {"SPIFFE_ENDPOINT_SOCKET": enrolled.endpoint}
    held = enrolled.sidecar.current_svid()
    assert held is not None
    out = tmp_path / "out"
    with trio.fail_after(60):
        done = await _meshid("workload", "fetch", "x509", "--out", str(out), env=env)
        assert done.returncode == 0, done.stderr
        assert f"{WEB} serial={held.serial:x}" in done.stdout.decode()
        assert (out / "svid.key").stat().st_mode & 0o777 == 0o600
        assert b"BEGIN CERTIFICATE" in (out / "bundle.pem").read_bytes()
        done = await _meshid(
            "workload", "fetch", "jwt", "--audience", "db", "--socket", str(enrolled.socket)
        )
        assert done.returncode == 0, done.stderr
        token = done.stdout.decode().strip()
        done = await _meshid("workload", "validate", "jwt", token, "--audience", "db", env=env)
        assert done.returncode == 0, done.stderr
        doc = json.loads(done.stdout)
        assert doc["spiffe_id"] == str(WEB) and doc["claims"]["aud"] == ["db"]
        done = await _meshid("workload", "validate", "jwt", token, "--audience", "x", env=env)
        assert done.returncode == 1
        lines = done.stderr.decode().strip().splitlines()
        assert len(lines) == 1 and "audience" in lines[0], lines


async def test_cli_watch_prints_each_update(enrolled: Enrolled) -> None:
    env = {**os.environ, "SPIFFE_ENDPOINT_SOCKET": enrolled.endpoint}
    proc = await trio.lowlevel.open_process(
        [str(MESHID), "workload", "watch"], stdout=subprocess.PIPE, env=env
    )
    try:
        assert proc.stdout is not None
        seen = b""
        with trio.fail_after(60):
            while seen.count(b"\n") < 1:
                seen += await proc.stdout.receive_some()
            assert enrolled.sidecar.dynamic is not None
            await enrolled.sidecar.dynamic.renew()
            while seen.count(b"\n") < 2:
                seen += await proc.stdout.receive_some()
        serial = enrolled.sidecar.current_svid().serial  # type: ignore[union-attr]
        assert f"serial={serial:x}" in seen.decode().splitlines()[1]
    finally:
        proc.kill()
        await proc.wait()


async def test_cli_without_a_socket_is_one_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "SPIFFE_ENDPOINT_SOCKET"}
    with trio.fail_after(60):
        done = await trio.run_process(
            [str(MESHID), "workload", "fetch", "x509", "--socket", str(tmp_path / "none.sock")],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=env,
        )
    assert done.returncode == 1
    assert len(done.stderr.decode().strip().splitlines()) == 1
    assert "cannot connect" in done.stderr.decode()


async def test_jwt_bundle_stream_pushes_a_rotated_key(enrolled: Enrolled) -> None:
    from ca.jwtkeys import JwtKeyring
    from sidecar.workload import proto
    from sidecar.workload.client import call

    api = enrolled.sidecar.workload_api
    assert api is not None and api.jwt is not None
    with trio.fail_after(20):
        async with call(enrolled.endpoint, "FetchJWTBundles") as messages:
            stream = messages.__aiter__()
            first = proto.decode_bundles(await stream.__anext__(), 1)
            kids = [k["kid"] for k in json.loads(first["spiffe://example.org"])["keys"]]
            assert len(kids) == 1
            rotated = JwtKeyring(enrolled.state, utcnow).rotate()  # as another process would
            await api.jwt.fetch()  # what the refresh loop does every 30 s
            second = proto.decode_bundles(await stream.__anext__(), 1)
            keys = json.loads(second["spiffe://example.org"])["keys"]
            assert [k["kid"] for k in keys] == [kids[0], rotated.kid]
            assert all(k["use"] == "jwt-svid" for k in keys)
