"""One `meshid ca serve` per state directory, and a port in use said plainly (real processes)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from ca_helpers import MESHID


def _meshid(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([MESHID, *args], capture_output=True, text=True, timeout=60)


@contextmanager
def serving(state: Path, log: Path, *extra: str) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """`meshid ca serve` on a free port, up (its `serving` line logged); killed by pid after."""
    argv = [MESHID, "ca", "serve", "--state", str(state), "--listen", "127.0.0.1:0", *extra]
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            lines = [line for line in log.read_text().splitlines() if '"serving"' in line]
            if lines:
                break
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        port = int(json.loads(lines[0])["listen"].rsplit(":", 1)[1])
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _one_line(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 1, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), done.stderr
    return lines[0]


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_second_serve_on_the_same_state_is_refused_naming_the_pid(
    state: Path, tmp_path: Path, workers: str
) -> None:
    with serving(state, tmp_path / "ca.log", "--workers", workers) as (proc, port):
        for listen in ("127.0.0.1:0", f"127.0.0.1:{port}"):  # another port, and the same one
            line = _one_line(_meshid("ca", "serve", "--state", str(state), "--listen", listen))
            assert line == (
                f"Error: another meshid ca serve (pid {proc.pid}) is using {state}; stop it first"
            )
        assert proc.poll() is None  # the running one is untouched
        # the other commands keep working beside it, under their own short locks
        assert _meshid("policy", "allow", "web", "api", "--state", str(state)).returncode == 0
        token = _meshid("ca", "token", "web", "--state", str(state))
        assert token.returncode == 0 and token.stdout.startswith("mjt_")
        assert _meshid("ca", "status", "--state", str(state)).returncode == 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    # once it has stopped, the state directory is free again
    with serving(state, tmp_path / "again.log") as (again, _):
        assert again.poll() is None


def test_a_killed_serve_leaves_no_stale_lock(state: Path, tmp_path: Path) -> None:
    with serving(state, tmp_path / "ca.log") as (proc, _):
        proc.kill()
        proc.wait()
    with serving(state, tmp_path / "again.log") as (again, _):
        assert again.poll() is None


def test_serve_on_another_state_dir_is_not_blocked(state: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    assert (
        _meshid("ca", "init", "--state", str(other), "--trust-domain", "example.org").returncode
        == 0
    )
    with serving(state, tmp_path / "a.log"), serving(other, tmp_path / "b.log") as (proc, _):
        assert proc.poll() is None


def test_a_port_in_use_says_what_to_do(state: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = _one_line(
            _meshid("ca", "serve", "--state", str(state), "--listen", f"127.0.0.1:{port}")
        )
    assert line.startswith(f"Error: cannot listen on 127.0.0.1:{port}: another process")
    assert "--listen" in line and "Errno" not in line
