"""Processes the bench starts: launch, wait for a listener, measure, and stop by pid.

Every process goes through a `Supervisor`, which stops exactly the processes
it started (SIGTERM, then SIGKILL after a grace period), in reverse order,
however the bench ends. Nothing is ever stopped by name.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """Something the bench needs did not happen (a process died, a port never opened)."""


@dataclass(eq=False)
class Proc:
    """One started process: its pid, its argv, and where its output went."""

    name: str
    argv: list[str]
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def rss_kib(self) -> int:
        return rss_kib(self.pid)

    def check_alive(self) -> None:
        if not self.alive():
            tail = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise BenchError(
                f"{self.name} (pid {self.pid}) exited {self.popen.returncode}:\n{tail}"
            )


@dataclass
class Supervisor:
    """Starts processes and stops exactly those, by pid, in reverse order."""

    logdir: Path
    procs: list[Proc] = field(default_factory=list)
    _on_term: object = None  # the SIGTERM handler before ours, put back on exit

    def start(
        self, name: str, argv: Sequence[str], *, cwd: Path | None = None, stdin_devnull: bool = True
    ) -> Proc:
        log = self.logdir / f"{name}.log"
        out = log.open("ab")
        try:
            popen = subprocess.Popen(
                list(argv),
                cwd=cwd,
                stdin=subprocess.DEVNULL if stdin_devnull else None,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        finally:
            out.close()
        proc = Proc(name, list(argv), popen, log)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc, grace: float = 5.0) -> None:
        stop_process(proc.popen, grace)
        with contextlib.suppress(ValueError):
            self.procs.remove(proc)

    def stop_all(self) -> None:
        while self.procs:
            self.stop(self.procs[-1])

    def __enter__(self) -> Supervisor:
        # A bench stopped with SIGTERM unwinds like one stopped with ^C: every `with`
        # around it (this one, a throwaway PostgreSQL) stops what it started.
        self._on_term = signal.signal(signal.SIGTERM, _exit_on_term)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop_all()
        finally:
            signal.signal(signal.SIGTERM, self._on_term)  # type: ignore[arg-type]


def _exit_on_term(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def stop_process(popen: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """SIGTERM this one pid, wait up to `grace`, then SIGKILL it."""
    if popen.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        popen.send_signal(signal.SIGTERM)
    try:
        popen.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            popen.kill()
        popen.wait(timeout=grace)


@dataclass(frozen=True)
class Finished:
    """A load generator that ran to completion, with the CPU time it used."""

    returncode: int
    output: str
    wall: float
    cpu: float


def run_measured(argv: Sequence[str], timeout: float) -> Finished:
    """Run a command to completion; report its CPU seconds (user + system) from wait4."""
    started = time.monotonic()
    popen = subprocess.Popen(
        list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    out_fd = popen.stdout
    assert out_fd is not None
    chunks: list[bytes] = []
    os.set_blocking(out_fd.fileno(), False)
    deadline = started + timeout
    usage: resource.struct_rusage | None = None
    status = 0
    try:
        while True:
            with contextlib.suppress(BlockingIOError):
                while data := out_fd.read(65536):
                    chunks.append(data)
            pid, status, usage = os.wait4(popen.pid, os.WNOHANG)
            if pid == popen.pid:
                break
            if time.monotonic() > deadline:
                raise BenchError(f"{argv[0]} did not finish within {timeout:.0f}s")
            time.sleep(0.02)
        with contextlib.suppress(BlockingIOError, ValueError):
            while data := out_fd.read(65536):
                chunks.append(data)
    finally:
        if usage is None:
            stop_process(popen)
        else:
            popen.returncode = os.waitstatus_to_exitcode(status)
        out_fd.close()
    wall = time.monotonic() - started
    return Finished(
        returncode=popen.returncode,
        output=b"".join(chunks).decode(errors="replace"),
        wall=wall,
        cpu=usage.ru_utime + usage.ru_stime,
    )


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process (all its threads)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is state (field 3); utime and stime are fields 14 and 15
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise BenchError(f"pid {pid} has no VmRSS")


def thread_count(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    return 0


def listening_ports(pid: int | None = None) -> set[int]:
    """Ports listening in our network namespace, or in that of process `pid`."""
    ports: set[int] = set()
    base = "/proc/net" if pid is None else f"/proc/{pid}/net"
    for table in (f"{base}/tcp", f"{base}/tcp6"):
        with contextlib.suppress(OSError), open(table, encoding="ascii") as f:
            next(f)
            for line in f:
                parts = line.split()
                if parts[3] == "0A":  # LISTEN
                    ports.add(int(parts[1].rsplit(":", 1)[1], 16))
    return ports


def wait_listening(procs: Sequence[Proc], ports: Sequence[int], timeout: float = 20.0) -> None:
    """Wait until every port listens, without connecting (a probe would go through a proxy)."""
    deadline = time.monotonic() + timeout
    while True:
        for proc in procs:
            proc.check_alive()
        missing = set(ports) - listening_ports()
        if not missing:
            return
        if time.monotonic() > deadline:
            raise BenchError(f"ports {sorted(missing)} not listening after {timeout:.0f}s")
        time.sleep(0.05)


def wait_until(
    what: str, condition: Callable[[], object], procs: Sequence[Proc], timeout: float = 20.0
) -> None:
    """Poll `condition` until it holds; BenchError after `timeout` s or if a process dies."""
    deadline = time.monotonic() + timeout
    while not condition():
        for proc in procs:
            proc.check_alive()
        if time.monotonic() > deadline:
            raise BenchError(f"no {what} after {timeout:.0f}s")
        time.sleep(0.05)


def free_ports(n: int) -> list[int]:
    """N distinct free ports on 127.0.0.1 (bound to 0, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def raise_nofile(want: int = 65536) -> int:
    """Raise RLIMIT_NOFILE (inherited by every process we start); returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(want, soft), max(want, hard)))
        return max(want, soft)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    return soft


@contextlib.contextmanager
def cpu_window(procs: Sequence[Proc]) -> Iterator[dict[str, float]]:
    """CPU seconds each process used inside the block, filled in when it ends."""
    before = {p.name: p.cpu_seconds() for p in procs}
    result: dict[str, float] = {}
    yield result
    for p in procs:
        if p.alive():
            result[p.name] = p.cpu_seconds() - before[p.name]
