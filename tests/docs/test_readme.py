"""The README's commands, run as written.

Every ```sh block of README.md runs, in order, in one bash session in an
empty directory, with the installed `meshid` first on the PATH. Blocks
marked ```console (make targets) or ```text (samples) are not run here:
`make demo` and `make test` are what CI runs, and deploy/ commands are
checked against the CLI by tests/deploy.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def sh_blocks(text: str) -> list[str]:
    return re.findall(r"^```sh\n(.*?)^```", text, flags=re.S | re.M)


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
    script += "\n".join(blocks)
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
