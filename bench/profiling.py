"""py-spy around one extra repetition: record each Python process, then summarise.

py-spy is optional: the bench installs it into the venv when it can and
otherwise reports figures without profiles. Recording is ``py-spy record
--nonblocking --format raw`` (collapsed stacks; idle threads are not sampled,
so every sample is the process doing work), stopped with SIGINT by pid.
Native frames are not sampled, so time inside OpenSSL shows up in the Python
function that called it (``recv_into``, ``send``, ``do_handshake`` in
``OpenSSL/SSL.py``).
"""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench.procs import stop_process
from bench.topology import Chain


def py_spy_path() -> Path | None:
    here = Path(sys.executable).parent / "py-spy"
    if here.exists():
        return here
    found = shutil.which("py-spy")
    return Path(found) if found else None


@dataclass
class Profile:
    role: str
    samples: int
    leaf: list[tuple[str, float]] = field(default_factory=list)  # function, % of samples
    categories: list[tuple[str, float]] = field(default_factory=list)
    inclusive: list[tuple[str, float]] = field(default_factory=list)
    raw: Path | None = None


# Where the time goes, by the file of the innermost Python frame (first match wins).
CATEGORIES = (
    ("OpenSSL/SSL.py", "pyOpenSSL + OpenSSL C (TLS records, handshakes, crypto)"),
    ("OpenSSL/crypto.py", "pyOpenSSL + OpenSSL C (certificates)"),
    ("cryptography/", "cryptography (certificate parsing)"),
    ("/trio/", "trio scheduler and I/O waits"),
    ("sidecar/pump.py", "sidecar copy loop (pump.py, flow.py)"),
    ("sidecar/flow.py", "sidecar copy loop (pump.py, flow.py)"),
    ("sidecar/tlsio.py", "TLS records and crypto (tlsio.py: OpenSSL's SSL_read/SSL_write)"),
    ("sidecar/", "sidecar connection setup, policy, metrics"),
    ("meshid/events.py", "decision log (JSON lines)"),
    ("json/", "decision log (JSON lines)"),
    ("meshid/", "meshid kernel (SVID checks, policy)"),
    ("prometheus_client/", "metrics"),
    ("socket.py", "stdlib socket"),
)
# Frames worth following inclusively (share of samples with this frame on the stack).
INCLUSIVE = (
    "handshake",
    "verify",
    "judge_facts",
    "step_up",
    "step_down",
    "on_event",
    "connect",
    "emit",
    "keep_session",
    "serve_connection",
    "_destination",  # a captured connection's original destination and its identity
)
FRAME = re.compile(r"^(?P<func>[^ ]+) \((?P<file>[^:]+)(?::\d+)?\)$")


def _frame(text: str) -> tuple[str, str]:
    m = FRAME.match(text.strip())
    if not m:
        return text.strip(), ""
    return m.group("func"), m.group("file")


ROOT = str(Path(__file__).resolve().parents[1])  # the project, wherever it is checked out


def _short(path: str) -> str:
    for marker in ("site-packages/", "python3.11/", f"{ROOT}/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def summarise(role: str, raw: Path, top: int = 8) -> Profile:
    leaf: Counter[str] = Counter()
    cats: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame(f) for f in stack.split(";")]
        frames = [f for f in frames if f[1]]  # drop "process"/"thread" pseudo-frames
        if not frames:
            continue
        total += count
        func, file = frames[-1]
        leaf[f"{func} ({_short(file)})"] += count
        cats[next((name for key, name in CATEGORIES if key in "/" + file), "other Python")] += count
        for name in {f.rsplit(".", 1)[-1] for f, _ in frames} & set(INCLUSIVE):
            incl[name] += count
    if total == 0:
        return Profile(role, 0, raw=raw)

    def pct(c: Counter[str], n: int) -> list[tuple[str, float]]:
        return [(k, 100 * v / total) for k, v in c.most_common(n)]

    return Profile(role, total, pct(leaf, top), pct(cats, 12), pct(incl, len(INCLUSIVE)), raw)


@contextlib.contextmanager
def record(chain: Chain, outdir: Path, label: str) -> Iterator[dict[str, Path]]:
    """Record every Python role of the chain while the block runs."""
    spy = py_spy_path()
    files: dict[str, Path] = {}
    running: list[subprocess.Popen[bytes]] = []
    if spy is None or not chain.python:
        yield files
        return
    try:
        for role in chain.python:
            out = outdir / f"{label}-{chain.kind}-{role.replace(' ', '_')}.txt"
            files[role] = out
            log = (outdir / f"{out.stem}.py-spy.log").open("wb")
            running.append(
                subprocess.Popen(
                    [
                        *(str(spy), "record", "--nonblocking", "--format", "raw", "-r", "200"),
                        *("-d", "300", "-o", str(out), "--pid", str(chain.procs[role].pid)),
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
            log.close()
        time.sleep(1.0)  # let py-spy attach before the load starts
        yield files
    finally:
        for p in running:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in running:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                stop_process(p)
