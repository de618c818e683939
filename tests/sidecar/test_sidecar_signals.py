"""Signals are honoured in every state of the real CLI, enrollment included."""

from __future__ import annotations

import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from sidecar_helpers import (
    TD,
    Backend,
    client_context,
    read_events,
    running_cli,
    tls_connect,
    wait_event,
)
from sidecar_mesh import Pki, write_static_config


@pytest.fixture
def dead_authority() -> Iterator[tuple[str, int]]:
    """A loopback port that refuses connections: bound, never listening."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock.getsockname()[:2]
    finally:
        sock.close()


def _dynamic_config(directory: Path, pki: Pki, authority: tuple[str, int]) -> Path:
    (directory / "bundle.pem").write_bytes(pki.bundle_pem)
    (directory / "web.token").write_text("not-a-real-token-but-never-sent\n")
    config = directory / "sidecar.toml"
    config.write_text(
        f'identity = "web"\ntrust_domain = "{TD}"\n'
        f'[authority]\nserver = "{authority[0]}:{authority[1]}"\nbundle = "bundle.pem"\n'
        'token_file = "web.token"\nstate_dir = "state"\n'
        '[[outbound]]\nlisten = "127.0.0.1:0"\nupstream = "127.0.0.1:9"\nidentity = "api"\n'
        '[log]\nfile = "events.jsonl"\n'
    )
    return config


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_signal_stops_a_sidecar_waiting_to_enroll(
    pki: Pki, tmp_path: Path, dead_authority: tuple[str, int], signum: signal.Signals
) -> None:
    config = _dynamic_config(tmp_path, pki, dead_authority)
    log = tmp_path / "events.jsonl"
    async with running_cli(config, tmp_path / "stderr.txt") as proc:
        with trio.fail_after(30):
            failed = await wait_event(log, "enroll_failed")
            proc.send_signal(signum)
            returncode = await proc.wait()
    assert failed["reason"]  # it was backing off, not serving, when the signal came
    assert returncode == 0, (tmp_path / "stderr.txt").read_text()
    [sig] = [e for e in read_events(log) if e["event"] == "signal"]
    assert (sig["signal"], sig["action"]) == (signum.name, "stop")
    assert not any(e["event"] == "started" for e in read_events(log))


async def test_second_signal_stops_a_draining_sidecar_at_once(
    backend: Backend, pki: Pki, tmp_path: Path
) -> None:
    """SIGTERM drains (here for up to an hour); a second signal cuts and exits."""
    config = write_static_config(
        tmp_path, pki, backend.addr, extra='[limits]\ndrain_timeout = "1h"\n'
    )
    log = tmp_path / "events.jsonl"
    async with running_cli(config, tmp_path / "stderr.txt") as proc:
        with trio.fail_after(30):
            started = await wait_event(log, "started")
            host, port = started["listeners"]["inbound[0]"].rsplit(":", 1)
            ctx = client_context(tmp_path, pki.bundle_pem, pki.issue("web"))
            live = await tls_connect((host, int(port)), ctx)
            async with live:
                await live.send_all(b"ping")
                assert await live.receive_some(100) == b"ping"
                proc.send_signal(signal.SIGTERM)
                await wait_event(log, "draining")
                assert proc.poll() is None  # draining: the live connection may finish
                proc.send_signal(signal.SIGINT)
                returncode = await proc.wait()
    assert returncode == 0, (tmp_path / "stderr.txt").read_text()
    signals = [(e["signal"], e["action"]) for e in read_events(log) if e["event"] == "signal"]
    assert signals == [("SIGTERM", "drain"), ("SIGINT", "stop")]
