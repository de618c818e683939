"""The Workload API on a static sidecar, with real clients: py-spiffe, grpcio, raw HTTP/2.

py-spiffe and grpcio block, so they run in threads; the sidecar runs in this
trio loop. Sockets live in short 0700 directories under /tmp.
"""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import h2.connection
import h2.events
import pytest
import trio
from cryptography.hazmat.primitives import serialization
from sidecar_helpers import metric
from sidecar_mesh import Mesh, Pki
from spiffe import WorkloadApiClient, X509Source
from workload_helpers import raw_call, short_dir

from meshid.errors import ConfigError
from sidecar.workload.unixsocket import bind_unix, remove_if_ours


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    with short_dir() as path:
        yield path


def _api(sock: Path, **extra: object) -> dict[str, object]:
    return {"socket": str(sock), "allow_uids": [os.getuid()], **extra}


async def _in_thread(fn, *args):  # type: ignore[no-untyped-def]
    return await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=True)


async def test_py_spiffe_fetches_svid_key_and_bundle(mesh: Mesh, pki: Pki, sock_dir: Path) -> None:
    sock = sock_dir / "api.sock"
    web = await mesh.start("web", workload_api=_api(sock))
    held = web.sidecar.current_svid()
    assert held is not None

    def fetch():  # type: ignore[no-untyped-def]
        with WorkloadApiClient(f"unix://{sock}") as client:
            return client.fetch_x509_context(), client.fetch_x509_bundles()

    with trio.fail_after(10):
        context, bundles = await _in_thread(fetch)
    svid = context.default_svid
    assert str(svid.spiffe_id) == str(held.spiffe_id)
    assert svid.leaf.serial_number == held.serial
    ours = held.key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    theirs = svid.private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert ours == theirs
    bundle = bundles.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
    assert bundle is not None
    assert pki.root in bundle.x509_authorities


async def test_stream_delivers_renewal_without_reconnecting(
    mesh: Mesh, pki: Pki, sock_dir: Path
) -> None:
    sock = sock_dir / "api.sock"
    web = await mesh.start("web", workload_api=_api(sock))
    token = trio.lowlevel.current_trio_token()
    send, receive = trio.open_memory_channel[int](100)
    errors: list[Exception] = []
    client = WorkloadApiClient(f"unix://{sock}")

    def on_success(ctx) -> None:  # type: ignore[no-untyped-def]
        serial = ctx.default_svid.leaf.serial_number
        trio.from_thread.run_sync(send.send_nowait, serial, trio_token=token)

    handle = client.stream_x509_contexts(on_success, errors.append, retry_connect=False)
    try:
        with trio.fail_after(10):
            first = await receive.receive()
            renewed = pki.issue("web")
            web.write_creds(renewed)
            new_serial = renewed.chain[0].serial_number
            assert await receive.receive() == new_serial
        assert first != new_serial
        assert not errors
        # one connection all along: the renewal came down the same stream
        assert web.sidecar.workload_api.server.connections == 1  # type: ignore[union-attr]
    finally:
        handle.cancel()
        client.close()


async def test_x509_source(mesh: Mesh, sock_dir: Path) -> None:
    sock = sock_dir / "api.sock"
    web = await mesh.start("web", workload_api=_api(sock))

    def source_id() -> str:
        source = X509Source(socket_path=f"unix://{sock}", timeout_in_seconds=5)
        try:
            return str(source.get_x509_context().default_svid.spiffe_id)
        finally:
            source.close()

    with trio.fail_after(10):
        assert await _in_thread(source_id) == str(web.sidecar.identity)


async def test_missing_header_is_invalid_argument(mesh: Mesh, sock_dir: Path) -> None:
    sock = sock_dir / "api.sock"
    web = await mesh.start("web", workload_api=_api(sock))
    with trio.fail_after(10):
        with pytest.raises(grpc.RpcError) as caught:
            await _in_thread(lambda: raw_call(sock, "FetchX509SVID", metadata=(), stream=True))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "workload.spiffe.io" in caught.value.details()
    with trio.fail_after(10), pytest.raises(grpc.RpcError) as caught:
        await _in_thread(lambda: raw_call(sock, "NoSuchMethod"))
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    labels = {"method": "FetchX509SVID", "reason": "workload_api_missing_header"}
    assert metric(web.sidecar, "meshid_workload_api_calls_total", **labels) == 1
    unknown = {"method": "unknown", "reason": "workload_api_bad_request"}
    assert metric(web.sidecar, "meshid_workload_api_calls_total", **unknown) == 1


async def test_unlisted_caller_is_refused(mesh: Mesh, sock_dir: Path) -> None:
    """Only our uid is listed; nobody (reaching the socket through its group) is refused."""
    sock = sock_dir / "api.sock"
    web = await mesh.start("web", workload_api=_api(sock))
    os.chmod(sock_dir, 0o755)
    os.chown(sock, -1, 65534)
    # The client's bytes come from h2 here; the other uid only pipes them through the socket.
    client = h2.connection.H2Connection()
    client.initiate_connection()
    client.send_headers(
        1,
        [
            (":method", "POST"),
            (":scheme", "http"),
            (":authority", "localhost"),
            (":path", "/SpiffeWorkloadAPI/FetchX509SVID"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            ("workload.spiffe.io", "true"),
        ],
    )
    client.send_data(1, b"\x00\x00\x00\x00\x00", end_stream=True)
    pipe = (
        "import socket,sys\n"
        "s=socket.socket(socket.AF_UNIX);s.settimeout(10);s.connect(sys.argv[1])\n"
        "s.sendall(sys.stdin.buffer.read())\n"
        "while d := s.recv(65536):\n"
        "  sys.stdout.buffer.write(d);sys.stdout.flush()\n"
    )
    args = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    args += ["/usr/bin/python3", "-c", pipe, str(sock)]
    trailers: dict[bytes, bytes] = {}
    with trio.fail_after(15):
        proc = await trio.lowlevel.open_process(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            assert proc.stdin is not None and proc.stdout is not None
            await proc.stdin.send_all(client.data_to_send())
            await proc.stdin.aclose()
            while b"grpc-status" not in trailers:
                data = await proc.stdout.receive_some()
                assert data, "connection closed before the status"
                for event in client.receive_data(data):
                    if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
                        trailers.update(dict(event.headers))  # type: ignore[arg-type]
        finally:
            proc.kill()
            await proc.wait()
    assert trailers.get(b"grpc-status") == b"7"  # PERMISSION_DENIED
    assert b"65534" in trailers.get(b"grpc-message", b"")
    assert web.sidecar.workload_api is not None


async def test_socket_mode_stale_replaced_removed_on_exit(
    mesh: Mesh, sock_dir: Path, nursery: trio.Nursery
) -> None:
    sock = sock_dir / "api.sock"
    stale, _ = bind_unix(sock)
    stale.close()  # a socket file nobody answers on
    web = await mesh.start("web", workload_api=_api(sock))
    assert stat.S_ISSOCK(os.lstat(sock).st_mode)
    assert stat.S_IMODE(os.lstat(sock).st_mode) == 0o660
    with pytest.raises(ConfigError, match="served by another process"):
        bind_unix(sock)
    web.sidecar.request_drain()
    with trio.fail_after(10):
        await web.sidecar.stopped.wait()
    assert not sock.exists()


async def test_socket_directory_is_made_if_its_parent_exists(sock_dir: Path) -> None:
    sock, inode = bind_unix(sock_dir / "run" / "api.sock")
    try:
        assert stat.S_IMODE(os.stat(sock_dir / "run").st_mode) == 0o750
    finally:
        sock.close()
        remove_if_ours(sock_dir / "run" / "api.sock", inode)
        (sock_dir / "run").rmdir()
    with pytest.raises(ConfigError, match="No such file"):
        bind_unix(sock_dir / "a" / "b" / "api.sock")


def test_socket_refuses_other_files_and_open_directories(sock_dir: Path) -> None:
    (sock_dir / "file").write_text("not a socket")
    with pytest.raises(ConfigError, match="not a socket"):
        bind_unix(sock_dir / "file")
    (sock_dir / "file").unlink()
    os.chmod(sock_dir, 0o777)
    try:
        with pytest.raises(ConfigError, match="writable by others"):
            bind_unix(sock_dir / "api.sock")
    finally:
        os.chmod(sock_dir, 0o700)


def test_setpriv_is_available() -> None:
    done = subprocess.run(["setpriv", "--version"], capture_output=True, check=False)
    assert done.returncode == 0


async def test_static_sidecar_serves_no_jwt(mesh: Mesh, sock_dir: Path) -> None:
    sock = sock_dir / "api.sock"
    await mesh.start("web", workload_api=_api(sock))
    for method in ("FetchJWTSVID", "FetchJWTBundles", "ValidateJWTSVID"):
        with trio.fail_after(10), pytest.raises(grpc.RpcError) as caught:
            await _in_thread(
                lambda m=method: raw_call(sock, m, b"\x0a\x02db", stream=m == "FetchJWTBundles")
            )
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, method


async def test_static_sidecar_with_a_jwt_key(mesh: Mesh, sock_dir: Path, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    key_file = tmp_path / "jwt.key"
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_file.chmod(0o600)
    sock = sock_dir / "api.sock"
    web = await mesh.start("web", workload_api=_api(sock, jwt_key=str(key_file)))

    def run() -> tuple[str, str]:
        from spiffe import JwtSource

        source = JwtSource(socket_path=f"unix://{sock}", timeout_in_seconds=5)
        try:
            svid = source.fetch_svid({"db"})
            bundle = source.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
            assert bundle is not None and len(bundle.jwt_authorities) == 1
        finally:
            source.close()
        with WorkloadApiClient(f"unix://{sock}") as client:
            return str(svid.spiffe_id), str(client.validate_jwt_svid(svid.token, "db").spiffe_id)

    with trio.fail_after(15):
        assert await _in_thread(run) == (str(web.sidecar.identity), str(web.sidecar.identity))


async def test_a_jwt_key_others_can_read_is_refused(
    mesh: Mesh, sock_dir: Path, tmp_path: Path
) -> None:
    key_file = tmp_path / "jwt.key"
    key_file.write_text("not even a key")
    key_file.chmod(0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        await mesh.start("web", workload_api=_api(sock_dir / "api.sock", jwt_key=str(key_file)))
