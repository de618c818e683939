"""What lands on disk: private keys 0600 in a 0700 directory, and never on a terminal."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ca_helpers import TD, run

from ca.authority import Authority
from meshid.clock import system_clock


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_layout_and_modes(state: Path) -> None:
    assert _mode(state) == 0o700
    assert _mode(state / "keys") == 0o700
    assert _mode(state / "keys" / "root-1.key") == 0o600
    assert (state / "bundle.pem").read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
    assert not [p for p in state.iterdir() if p.name.startswith(".init-")]  # no staging left


def test_issue_writes_the_key_0600(state: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run("ca", "issue", "--state", str(state), "web", "--out", str(out))
    assert result.exit_code == 0, result.stderr
    assert _mode(out / "svid.key") == 0o600
    assert sorted(p.name for p in out.iterdir()) == ["bundle.pem", "svid.key", "svid.pem"]


def test_init_keeps_the_key_private_under_a_lax_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        Authority.init(tmp_path / "s", TD, clock=system_clock()).close()
    finally:
        os.umask(old)
    assert _mode(tmp_path / "s" / "keys" / "root-1.key") == 0o600
    assert _mode(tmp_path / "s" / "keys") == 0o700


def _secret_lines(pem: bytes) -> list[str]:
    """The base64 body of a PEM key, line by line."""
    return [line for line in pem.decode().splitlines() if line and not line.startswith("-----")]


def test_no_command_prints_a_private_key(tmp_path: Path) -> None:
    state, out, s = tmp_path / "state", tmp_path / "out", str(tmp_path / "state")
    passphrase = tmp_path / "pass"
    passphrase.write_text("correct horse battery staple\n")
    p = ("--passphrase-file", str(passphrase))
    results = [
        run("ca", "init", "--state", s, "--trust-domain", "example.org", *p),
        run("ca", "issue", "--state", s, "web", "--out", str(out), "--dns", "web.internal", *p),
        run("ca", "token", "--state", s, "api"),
        run("ca", "bundle", "--state", s),
        run("ca", "bundle", "--state", s, "--format", "spiffe"),
        run("policy", "allow", "web", "api", "--state", s),
        run("policy", "list", "--state", s),
        run("policy", "check", "web", "api", "--state", s),
        run("policy", "deny", "web", "api", "--state", s),
        run("ca", "revoke", "--state", s, "api"),
        # and the failures
        run("ca", "issue", "--state", s, "web", "--out", str(out)),  # no passphrase
        run("ca", "issue", "--state", s, "web", "--out", str(out), "--passphrase-file", s),
        run("ca", "init", "--state", s, "--trust-domain", "example.org", *p),
    ]
    assert [r.exit_code for r in results[:10]] == [0] * 10, [r.stderr for r in results]
    assert all(r.exit_code != 0 for r in results[10:])
    secrets = _secret_lines((state / "keys" / "root-1.key").read_bytes())
    secrets += _secret_lines((out / "svid.key").read_bytes())
    secrets.append("correct horse")
    for result in results:
        text = result.stdout + result.stderr
        assert "PRIVATE KEY" not in text
        for line in secrets:
            assert line not in text
