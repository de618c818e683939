"""A bench stopped with SIGTERM stops the processes it started, by pid."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

_BENCH = """
import sys, time
from pathlib import Path
from bench.procs import Supervisor
with Supervisor(Path(sys.argv[1])) as sup:
    child = sup.start("sleeper", [sys.executable, "-c", "import time; time.sleep(120)"])
    print(child.pid, flush=True)
    time.sleep(120)
"""


def _gone(pid: int, deadline: float) -> bool:
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_sigterm_to_a_bench_stops_what_it_started(tmp_path: Path) -> None:
    with subprocess.Popen(
        [sys.executable, "-c", _BENCH, str(tmp_path)], stdout=subprocess.PIPE, text=True
    ) as bench:
        child = 0
        try:
            assert bench.stdout is not None
            child = int(bench.stdout.readline())
            bench.send_signal(signal.SIGTERM)
            assert bench.wait(timeout=30) == 128 + signal.SIGTERM
            assert _gone(child, time.monotonic() + 30), "the bench left its child running"
        finally:
            if bench.poll() is None:
                bench.kill()
            if child:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)  # left behind: ours to stop
