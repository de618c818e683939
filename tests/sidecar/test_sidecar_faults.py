"""A failure inside one connection ends that connection only.

A fault is injected once at each stage of a connection's life (accept,
handshake, judging the peer, connecting, pumping bytes, closing) in the real
function that does that stage. Each time, the sidecars must log it once as
`internal_error` (with the exception's type, never its text), count it, and
go on: a connection that was already live keeps flowing, and a fresh one
gets through. A crash would end the test's nursery, and the test with it.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import socket
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from OpenSSL import SSL
from sidecar_helpers import (
    Backend,
    client_context,
    connect,
    metric,
    receive_exactly,
    roundtrip,
    tls_connect,
    wait_cut,
)
from sidecar_mesh import Mesh, Pair, Pki, Running

import sidecar.connection
import sidecar.gate
from sidecar.connection import Connections
from sidecar.pump import Pump
from sidecar.tlsio import TlsStream


def inject_once(
    monkeypatch: pytest.MonkeyPatch, owner: object, name: str, exc: BaseException
) -> list[int]:
    """Make `owner.name` raise `exc` on its next call only; returns a list that counts firings."""
    real: Callable[..., Any] = getattr(owner, name)
    fired: list[int] = []
    if inspect.iscoroutinefunction(real):

        async def async_fault(*args: Any, **kwargs: Any) -> Any:
            if not fired:
                fired.append(1)
                raise exc
            return await real(*args, **kwargs)

        monkeypatch.setattr(owner, name, async_fault)
    else:

        def fault(*args: Any, **kwargs: Any) -> Any:
            if not fired:
                fired.append(1)
                raise exc
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, fault)
    return fired


async def still_serving(pair: Pair, live: trio.SocketStream, tag: bytes) -> None:
    """The live connection keeps flowing and a new one gets through."""
    await live.send_all(tag)
    assert await receive_exactly(live, len(tag)) == tag
    assert await roundtrip(pair.app, b"fresh " + tag) == b"fresh " + tag


def internal_errors(pair: Pair) -> list[dict[str, Any]]:
    return pair.web.log.find("internal_error") + pair.api.log.find("internal_error")


async def wait_internal_error(pair: Pair) -> None:
    """Until either sidecar has logged an internal error (callers bound this)."""
    async with trio.open_nursery() as nursery:

        async def watch(side: Running) -> None:
            await side.log.wait_for("internal_error")
            nursery.cancel_scope.cancel()

        nursery.start_soon(watch, pair.web)
        nursery.start_soon(watch, pair.api)


# stage -> (where the fault goes, its name there, the exception)
STAGES: dict[str, tuple[object, str, BaseException]] = {
    "accept": (sidecar.connection, "accept", RuntimeError("accept broke")),
    "accept_oserror": (sidecar.connection, "accept", OSError(5, "EIO")),
    "handshake": (TlsStream, "handshake", RuntimeError("handshake broke")),
    "handshake_oserror": (TlsStream, "handshake", OSError(5, "EIO")),
    "judge": (sidecar.gate, "judge_facts", RuntimeError("judge broke")),
    "connect": (Connections, "connect_to", RuntimeError("connect broke")),
    "pump": (Pump, "copy", RuntimeError("pump broke")),
    "pump_oserror": (Pump, "copy", OSError(5, "EIO")),
    "pump_register": (Pump, "_register", OSError(9, "EBADF")),
    "close": (Connections, "log_close", RuntimeError("close broke")),
    "exception_group": (
        Connections,
        "connect_to",
        ExceptionGroup("nursery", [RuntimeError("a"), OSError(5, "EIO")]),
    ),
}


@pytest.mark.parametrize("stage", sorted(STAGES))
async def test_a_fault_at_any_stage_ends_that_connection_only(
    stage: str, pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    owner, name, exc = STAGES[stage]
    with trio.fail_after(20):
        live = await connect(pair.app)
        async with live:
            await live.send_all(b"warm")
            assert await receive_exactly(live, 4) == b"warm"
            fired = inject_once(monkeypatch, owner, name, exc)
            victim = await connect(pair.app)
            async with victim:
                # Whatever the victim gets (it may even be served, if the fault
                # only touched its close), it ends.
                with contextlib.suppress(trio.BrokenResourceError):
                    await victim.send_all(b"x")
                    await victim.send_eof()
                await wait_cut(victim)
            assert fired == [1]
            if stage != "judge":  # the verify callback refuses what it cannot judge
                await wait_internal_error(pair)
                for running in (pair.web, pair.api):  # no flow outlives its connection
                    assert len(running.sidecar.pump) <= len(running.sidecar.registry)
            await still_serving(pair, live, stage.encode())
    if stage == "judge":
        refused = pair.api.log.find("decision", decision="deny") + pair.web.log.find(
            "decision", decision="deny"
        )
        assert refused or internal_errors(pair)
        return
    [error] = internal_errors(pair)
    assert error["reason"] == "internal_error"
    assert error["error"] == type(exc).__name__
    assert str(exc) not in str(error)  # the type, never the text
    side = pair.web if error in pair.web.log.records else pair.api
    counted = metric(
        side.sidecar, "meshid_connections_total", decision="deny", reason="internal_error"
    ) + metric(side.sidecar, "meshid_connections_closed_total", reason="internal_error")
    assert counted == 1
    if stage in ("close", "pump", "pump_register"):
        assert error["established"] is True


async def test_a_failure_setting_the_sni_ends_that_connection_only(
    mesh: Mesh, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upstream by name sends SNI; if encoding or setting it fails, only that connection ends."""
    api = await mesh.start("api", forward=backend.addr, allow=[("web", "api")])
    web = await mesh.start(
        "web", outbound=[("api", ("localhost", api.inbound[1]))], allow=[("web", "api")]
    )
    assert web.sidecar.config.outbound[0].sni == b"localhost"
    pair = Pair(web, api, backend)
    fired = inject_once(
        monkeypatch, SSL.Connection, "set_tlsext_host_name", UnicodeError("label empty")
    )
    with trio.fail_after(20):
        victim = await connect(pair.app)
        async with victim:
            assert await wait_cut(victim) == b""
        [error] = await web.log.wait_for("internal_error")
        assert await roundtrip(pair.app, b"next") == b"next"
    assert fired == [1]
    assert error["error"] == "UnicodeError"
    assert metric(web.sidecar, "meshid_connections_total", reason="internal_error") == 1


async def test_peer_reset_while_app_is_slow_with_proxy_protocol(
    mesh: Mesh, pki: Pki, tmp_path: Path, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The peer resets after its handshake, before the app connection is up: no crash."""
    api = await mesh.start("api", forward=backend.addr, allow=[("web", "api")], proxy_protocol=True)
    peer_gone = trio.Event()
    connect_called = trio.Event()
    real_connect = Connections.connect_to

    async def slow_connect(self: Connections, addr: Any) -> socket.socket:
        connect_called.set()
        await peer_gone.wait()
        return await real_connect(self, addr)

    monkeypatch.setattr(Connections, "connect_to", slow_connect)
    ctx = client_context(tmp_path, pki.bundle_pem, pki.issue("web"))
    with trio.fail_after(20):
        stream = await tls_connect(api.inbound, ctx)
        await stream.do_handshake()
        await connect_called.wait()
        sock = stream.transport_stream.socket
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        peer_gone.set()
        [close] = await api.log.wait_for("close")
        monkeypatch.setattr(Connections, "connect_to", real_connect)
        # still serving: a good client gets its bytes echoed, after the PROXY header
        good = await tls_connect(api.inbound, ctx)
        async with good:
            await good.send_all(b"hello")
            # the backend echoes the PROXY header too; read past it to our bytes
            seen = b""
            while not seen.endswith(b"hello"):
                data = await good.receive_some(4096)
                assert data
                seen += data
    assert close["reason"] in ("peer_reset", "peer_truncated", "local_reset", "closed")
    assert not api.log.find("internal_error")


async def test_accept_survives_transient_errors(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """accept(2) errors that belong to the connection being accepted are retried, unlogged."""
    import errno

    fired = inject_once(monkeypatch, sidecar.connection, "accept", OSError(errno.ECONNABORTED, "x"))
    with trio.fail_after(20):
        assert await roundtrip(pair.app, b"after") == b"after"
    assert fired == [1]
    assert not internal_errors(pair)


def test_tls_shortcut_falls_back_when_pyopenssl_moves() -> None:
    """If pyOpenSSL's private error mapping is gone, the public wrappers are used."""
    code = (
        "from OpenSSL import SSL\n"
        "del SSL.Connection._raise_ssl_error\n"
        "import sidecar.tlsio as t\n"
        "assert t._SSL_read is None, 'shortcut kept without its error path'\n"
    )
    env = dict(os.environ)
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr.decode()
