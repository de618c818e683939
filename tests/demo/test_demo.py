"""`make demo` end to end: tools/demo.py as a subprocess, as an operator runs it.

The positive run must exit 0 and show every step; its twin makes one step fail
(an SVID that does not renew within the deadline) and must exit 1 saying why.
Both must leave no process behind and print every pid they stopped.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "tools" / "demo.py"
STOPPED = re.compile(r"\(pid (\d+)\) (?:stopped|killed)")


def run_demo(*code: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run the demo with this venv's python; `code` replaces the plain script run."""
    args = [sys.executable, "-c", "\n".join(code)] if code else [sys.executable, str(DEMO)]
    return subprocess.run(
        args,
        cwd=ROOT,
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=timeout,
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},
    )


def assert_all_stopped(out: str, count: int) -> None:
    pids = [int(p) for p in STOPPED.findall(out)]
    assert len(pids) == count, out
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def working_dir(out: str) -> Path:
    match = re.search(r"^working directory (\S+)$", out, re.MULTILINE)
    assert match, out
    return Path(match.group(1))


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_demo_runs_every_step() -> None:
    done = run_demo(timeout=120)
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "✗" not in out
    assert "✓ control plane serving on 127.0.0.1:" in out
    for name in ("api", "web", "batch"):
        assert f"enrolled as spiffe://example.org/{name}, serial" in out
    # web -> api goes through, and api learns the caller from the PROXY v2 header
    assert "✓ api answered: hello spiffe://example.org/web -- api here" in out
    assert '"decision":"allow","reason":"allowed","local_id":"spiffe://example.org/api"' in out
    # batch is refused by its own sidecar, and by api's when it skips its own
    assert re.search(
        r'"decision":"deny","reason":"not_allowed","detail":"no rule allows '
        r'spiffe://example.org/batch -> spiffe://example.org/api[^"]*",'
        r'"local_id":"spiffe://example.org/batch"',
        out,
    ), out
    assert '"local_id":"spiffe://example.org/api","peer_id":"spiffe://example.org/batch"' in out
    # a renewal with a new serial, seen by api on the next connection
    renewed = re.search(r"✓ web renewed: serial ([0-9a-f]+) -> ([0-9a-f]+)", out)
    assert renewed and renewed.group(1) != renewed.group(2), out
    assert f"api's sidecar saw serial {renewed.group(2)}" in out
    assert "✓ the connection opened before the renewal still works" in out
    # the deny cuts the live connection, and new ones are refused
    assert re.search(r'"event":"close","direction":"\w+","reason":"policy_revoked"', out), out
    assert "✓ web's app saw its connection end" in out
    assert "✓ a new web -> api connection is refused: not_allowed" in out
    assert "✓ demo finished: all 6 steps did what they showed" in out
    assert_all_stopped(out, 4)
    assert not working_dir(out).exists()


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_demo_fails_when_a_step_does_not_happen() -> None:
    # An hour-long SVID is not renewed within a one-second deadline: step 5 fails.
    done = run_demo(
        "import sys",
        f"sys.path.insert(0, {str(DEMO.parent)!r})",
        "import demo",
        "demo.SVID_TTL = '1h'",
        "demo.RENEWAL_DEADLINE = 1.0",
        "sys.exit(demo.main([]))",
        timeout=60,
    )
    out = done.stdout
    assert done.returncode == 1, out + done.stderr
    assert "✗ no 'renewed' line from web's sidecar within 1s" in out
    assert "✗ demo failed at step 5" in out
    assert "demo finished" not in out
    assert_all_stopped(out, 4)
    kept = working_dir(out)  # kept for the post-mortem, and says so
    assert f"logs and state kept in {kept}" in out
    assert (kept / "web.log").exists()
    shutil.rmtree(kept)
