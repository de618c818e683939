"""`meshid ca serve` as an operator runs it: a real process, its workers, its errors."""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from ca_helpers import MESHID, query, tls_exchange, wait_lines
from disk_helpers import fill


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _health(port: int, bundle: Path) -> dict[str, object]:
    ctx = ssl.create_default_context(cafile=str(bundle))
    ctx.check_hostname = False
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw) as tls,
    ):
        tls.sendall(b"GET /healthz HTTP/1.1\r\nhost: ca\r\nconnection: close\r\n\r\n")
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    doc = json.loads(body)
    assert isinstance(doc, dict)
    return doc


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@contextmanager
def serving_two_workers(state: Path, log: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """`meshid ca serve --workers 2`, up and logging; killed (by pid) if a test leaves it."""
    port = _free_port()
    argv = [MESHID, "ca", "serve", "--state", str(state), "--listen", f"127.0.0.1:{port}"]
    with log.open("wb") as out:
        proc = subprocess.Popen([*argv, "--workers", "2"], stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_workers_share_the_port_and_stop_together(state: Path, tmp_path: Path) -> None:
    log = tmp_path / "ca.log"
    with serving_two_workers(state, log) as (proc, port):
        serving = wait_lines(log, '"serving"', 2, proc)
        assert {json.loads(line)["worker"] for line in serving} == {0, 1}
        workers = _children(proc.pid)
        assert len(workers) == 2
        for _ in range(6):
            assert _health(port, state / "bundle.pem")["status"] == "ok"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        for pid in workers:  # no worker left behind
            assert (
                not Path(f"/proc/{pid}").exists()
                or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
            )


def test_a_dead_worker_takes_the_set_down_for_the_supervisor(state: Path, tmp_path: Path) -> None:
    log = tmp_path / "ca.log"
    with serving_two_workers(state, log) as (proc, _port):
        wait_lines(log, '"serving"', 2, proc)
        os.kill(_children(proc.pid)[0], signal.SIGKILL)
        assert proc.wait(timeout=30) == 1
        assert '"worker_died"' in log.read_text()


def _gone(pid: int) -> bool:
    """The process has exited (reaped, or a zombie its new parent has yet to reap)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX"
    except FileNotFoundError:
        return True


def test_workers_exit_when_the_parent_is_killed(state: Path, tmp_path: Path) -> None:
    """SIGKILL leaves the parent no chance to stop its workers: each notices on its own."""
    log = tmp_path / "ca.log"
    with serving_two_workers(state, log) as (proc, _port):
        wait_lines(log, '"serving"', 2, proc)
        workers = _children(proc.pid)
        assert len(workers) == 2
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 20
        while not all(_gone(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.05)  # polling a condition, with a deadline
        left = [pid for pid in workers if not _gone(pid)]
        for pid in left:  # never leave them behind, even when the test fails
            os.kill(pid, signal.SIGKILL)
        assert left == []


@pytest.mark.parametrize(
    ("listen", "message"),
    [("nonsense", "--listen 'nonsense': expected HOST:PORT"), ("127.0.0.1:99999", "expected")],
)
def test_bad_listen_address_is_one_line(state: Path, listen: str, message: str) -> None:
    done = subprocess.run(
        [MESHID, "ca", "serve", "--state", str(state), "--listen", listen],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_port_in_use_is_one_line(state: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [MESHID, "ca", "serve", "--state", str(state), "--listen", f"127.0.0.1:{port}"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


_exchange = tls_exchange


def test_head_is_answered_by_every_worker_and_ends_none(state: Path, tmp_path: Path) -> None:
    log = tmp_path / "ca.log"
    with serving_two_workers(state, log) as (proc, port):
        wait_lines(log, '"serving"', 2, proc)
        workers = _children(proc.pid)
        for _ in range(8):  # the kernel spreads new connections over both workers
            raw = _exchange(
                port,
                state / "bundle.pem",
                b"HEAD /v1/bundle HTTP/1.1\r\nhost: ca\r\nconnection: close\r\n\r\n",
            )
            head, _, body = raw.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200") and b"content-length: " in head.lower()
            assert body == b""
        for _ in range(6):
            assert _health(port, state / "bundle.pem")["status"] == "ok"
        assert proc.poll() is None and sorted(_children(proc.pid)) == sorted(workers)
        assert '"worker_died"' not in log.read_text()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])  # memfd table / database rows
def test_workers_share_one_guessing_limit(state: Path, tmp_path: Path, backend: str) -> None:
    log = tmp_path / "ca.log"
    guess = b'{"token":"mjt_guess","csr":"x"}'
    request = (
        b"POST /v1/enroll HTTP/1.1\r\nhost: ca\r\nconnection: close\r\n"
        b"content-length: %d\r\n\r\n%s" % (len(guess), guess)
    )
    with serving_two_workers(state, log) as (proc, port):
        wait_lines(log, '"serving"', 2, proc)
        statuses = [
            int(_exchange(port, state / "bundle.pem", request).split(b" ")[1]) for _ in range(11)
        ]
        logged = wait_lines(log, '"request"', 11, proc)
    # five failures in all, whichever worker saw them, block the source everywhere
    assert statuses[:5] == [400] * 5 and statuses[5:] == [429] * 6, statuses
    assert {json.loads(line)["worker"] for line in logged} == {0, 1}  # both took part
    if backend == "postgresql":  # counted where other instances count too
        assert query(state, "SELECT source FROM enroll_failures") == [("127.0.0.1",)]


@pytest.mark.parametrize("fault", ["full", "read_only"])
def test_serve_on_a_full_or_read_only_disk_fails_in_one_line(tiny_disk: Path, fault: str) -> None:
    state = tiny_disk / "state"
    done = subprocess.run(
        [MESHID, "ca", "init", "--state", str(state), "--trust-domain", "example.org"],
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    if fault == "full":
        fill(tiny_disk)
    else:
        subprocess.run(["mount", "-o", "remount,ro", str(tiny_disk)], check=True)
    done = subprocess.run(
        [MESHID, "ca", "serve", "--state", str(state), "--listen", "127.0.0.1:0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stderr.startswith("Error: ") and len(done.stderr.strip().splitlines()) == 1
    assert "Traceback" not in done.stderr


def _open_files_limit(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no open-files line")


@pytest.mark.parametrize("hard", [None, 512])  # None: this machine's hard limit
def test_serve_lifts_its_descriptor_limit_or_says_it_cannot(
    state: Path, tmp_path: Path, hard: int | None
) -> None:
    if hard is None:
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    need = 4096 + 16384 + 64  # the default caps and a reserve
    log = tmp_path / "ca.log"
    argv = [MESHID, "ca", "serve", "--state", str(state), "--listen", "127.0.0.1:0"]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard)),
        )
    try:
        wait_lines(log, '"serving"', 1, proc)
        unlimited = hard == resource.RLIM_INFINITY
        assert _open_files_limit(proc.pid) == (need if unlimited else min(hard, need))
        low = not unlimited and hard < 4096 + 64  # cannot hold the anonymous pool
        assert ('"file_limit_low"' in log.read_text()) is low
    finally:
        proc.kill()
        proc.wait()
