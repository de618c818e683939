"""`meshid sidecar redirect` against the kernel, in a network namespace of its own.

`--print` changes nothing, `--apply` twice leaves one `meshid` table, and
`--remove` leaves none (twice too). Needs root, `ip netns` and `nft`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.netns.test_multihost import MESHID, netns_unavailable

pytestmark = pytest.mark.slow

CONFIG = """
trust_domain = "example.org"
identity = "api"

[static]
cert = "c.pem"
key = "k.pem"
bundle = "b.pem"

[transparent]
app_ports = [8080]
advertise = ["198.18.0.3:8080"]
"""


@pytest.fixture
def ns() -> Iterator[str]:
    reason = netns_unavailable()
    if reason is None and shutil.which("nft") is None and not Path("/usr/sbin/nft").exists():
        reason = "no 'nft' command (nftables); 'make test' installs it"
    if reason is not None:
        pytest.skip(reason)
    name = f"meshid-redirect-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def run(ns: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", ns, *args], capture_output=True, text=True, timeout=30
    )


def tables(ns: str) -> list[str]:
    listed = run(ns, "nft", "list", "tables")
    assert listed.returncode == 0, listed.stderr
    return [line for line in listed.stdout.splitlines() if line.strip()]


def test_print_apply_twice_remove(ns: str, tmp_path: Path) -> None:
    config = tmp_path / "api.toml"
    config.write_text(CONFIG)
    meshid = [str(MESHID)]
    printed = run(ns, *meshid, "sidecar", "redirect", "--config", str(config), "--print")
    assert printed.returncode == 0, printed.stderr
    assert "redirect to :15006" in printed.stdout
    assert tables(ns) == []

    for _ in range(2):
        applied = run(ns, *meshid, "sidecar", "redirect", "--config", str(config), "--apply")
        assert applied.returncode == 0, applied.stderr
    assert tables(ns) == ["table inet meshid"]
    ruleset = run(ns, "nft", "list", "table", "inet", "meshid").stdout
    assert ruleset.count("redirect to :15001") == 1
    assert "meta mark 0x006d6964 return" in ruleset

    for _ in range(2):
        removed = run(ns, *meshid, "sidecar", "redirect", "--config", str(config), "--remove")
        assert removed.returncode == 0, removed.stderr
    assert tables(ns) == []
