"""`meshid doctor --config FILE`: a sidecar's config, files, modes and SVID, read-only."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from ca.authority import Authority
from meshid.cli import cli
from meshid.clock import system_clock
from meshid.spiffeid import TrustDomain


def _doctor(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, ["doctor", *args], prog_name="meshid")
    return result.exit_code, result.stdout, result.stderr


def _static(tmp_path: Path) -> Path:
    state = tmp_path / "state"
    Authority.init(state, TrustDomain.parse("example.org"), clock=system_clock()).close()
    out = tmp_path / "web"
    runner = CliRunner()
    issued = runner.invoke(cli, ["ca", "issue", "web", "--out", str(out), "--state", str(state)])
    assert issued.exit_code == 0, issued.output
    config = out / "sidecar.toml"
    config.write_text(
        'identity = "web"\ntrust_domain = "example.org"\n\n[static]\n'
        'cert = "svid.pem"\nkey = "svid.key"\nbundle = "bundle.pem"\n\n'
        '[inbound]\nlisten = "127.0.0.1:0"\nforward = "127.0.0.1:9"\n'
    )
    return config


def test_a_good_static_sidecar_passes(tmp_path: Path) -> None:
    config = _static(tmp_path)
    code, out, err = _doctor("--config", str(config))
    assert code == 0, out + err
    assert [line.split(":")[0] for line in out.splitlines()] == [
        "✓ config",
        "✓ files",
        "✓ svid_expiry",
    ]


def test_a_readable_key_and_a_missing_bundle_fail_with_hints(tmp_path: Path) -> None:
    config = _static(tmp_path)
    (config.parent / "svid.key").chmod(0o644)
    (config.parent / "bundle.pem").unlink()
    code, out, _ = _doctor("--config", str(config), "--json")
    assert code == 1
    doc = json.loads(out)
    files = next(c for c in doc["checks"] if c["name"] == "files")
    assert files["ok"] is False and "svid.key is 644" in files["detail"]
    assert "bundle.pem" in files["detail"] and files["hint"]


def test_a_config_that_does_not_load_is_one_failed_check(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('identity = "web"\n')
    code, out, _ = _doctor("--config", str(bad))
    assert code == 1 and out.startswith("✗ config:") and len(out.splitlines()) == 1
