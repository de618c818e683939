"""The README's commands, run as written.

Every ```sh block of README.md runs, in order, in one bash session in an
empty directory, with the installed `meshid` first on the PATH. The README
names fixed ports (18443, 18001, ...) so that a reader can type them; the test
moves each to a port the kernel just handed out, so two runs on one machine
(parallel workers, two checkouts) never meet. Blocks
marked ```console (make targets) or ```text (samples) are not run here:
`make demo` and `make test` are what CI runs, and deploy/ commands are
checked against the CLI by tests/deploy.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def sh_blocks(text: str) -> list[str]:
    return re.findall(r"^```sh\n(.*?)^```", text, flags=re.S | re.M)


LOOPBACK_PORT = re.compile(r"127\.0\.0\.1:(\d{4,5})\b")


def free_ports(count: int) -> list[int]:
    """`count` distinct ports that were free a moment ago (bound together, then released)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def with_free_ports(script: str) -> str:
    """`script` with each port it uses on 127.0.0.1 replaced, wherever it appears, by a free one."""
    fixed = sorted(set(LOOPBACK_PORT.findall(script)))
    if not fixed:
        return script
    moved = dict(zip(fixed, map(str, free_ports(len(fixed))), strict=True))
    # One pass, so a new port can never be taken for an old one still to be replaced.
    return re.sub(rf"\b({'|'.join(fixed)})\b", lambda m: moved[m.group(1)], script)


def test_ports_are_moved_wherever_they_appear() -> None:
    script = "serve --listen 127.0.0.1:18443 &\nwait_port 18443\n"
    script += "http.server 18080  # forward = 127.0.0.1:18080; 1h 180 184430"
    moved = with_free_ports(script)
    assert not re.search(r"\b(18443|18080)\b", moved)
    ports = LOOPBACK_PORT.findall(moved)
    assert len(ports) == 2 and ports[0] != ports[1]
    assert f"wait_port {ports[0]}" in moved or f"wait_port {ports[1]}" in moved
    assert "1h 180 184430" in moved  # other numbers are left alone


def test_readme_has_the_two_commands_first() -> None:
    text = (ROOT / "README.md").read_text()
    first_block = text.split("```")[1]
    assert "make demo" in first_block and "make test" in first_block


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_every_sh_block_runs_as_written(tmp_path: Path) -> None:
    blocks = sh_blocks((ROOT / "README.md").read_text())
    assert len(blocks) >= 5
    # Background jobs the README starts are stopped by the README itself; the trap only
    # covers a failure half way, and kills exactly the jobs this shell started.
    script = "set -euo pipefail\ntrap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n"
    script += with_free_ports("\n".join(blocks))
    assert "18443" not in script  # the README's ports were found and moved
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
    env.pop("MESHID_CA_STATE", None)
    done = subprocess.run(
        ["bash", "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    lines = out.splitlines()
    assert lines.count("200") >= 4  # both readyz, the first call, the call after the dry run
    assert "exit 1: default deny" in out
    assert "would cut 0 live connection(s)" in out
    assert any(line.startswith("refused:") for line in lines)  # after the revocation
    assert "audit log intact" in out
    key = tmp_path / "web-state" / "svid.key"
    assert key.stat().st_mode & 0o777 == 0o600
