"""`meshid doctor --config FILE`: a sidecar's config, files, modes and SVID, read-only."""

from __future__ import annotations

import json
from pathlib import Path

import trio
from click.testing import CliRunner
from sidecar_helpers import closed_port, fmt
from test_sidecar_control_failures import control_plane, make_authority

from ca.authority import Authority
from meshid.cli import cli
from meshid.clock import system_clock
from meshid.spiffeid import TrustDomain
from sidecar.doctor import check_config


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


async def test_each_authority_server_is_checked_on_its_own(tmp_path: Path) -> None:
    """A list of servers: one check per server, named by its place in the list."""
    served = control_plane(make_authority(tmp_path / "authority"))
    try:
        async with trio.open_nursery() as nursery:
            live = await nursery.start(served.plane.serve)
            dead = await closed_port()
            with dead:
                servers = [fmt(dead.getsockname()[:2]), fmt(live)]
                config = tmp_path / "web" / "sidecar.toml"
                config.parent.mkdir()
                (config.parent / "bundle.pem").write_bytes(served.authority.bundle().to_pem())
                (config.parent / "web.token").write_text("mjt_x\n")
                config.write_text(
                    'identity = "web"\ntrust_domain = "example.org"\n\n[authority]\n'
                    f"server = {json.dumps(servers)}\n"
                    'bundle = "bundle.pem"\ntoken_file = "web.token"\nstate_dir = "st"\n\n'
                    '[inbound]\nlisten = "127.0.0.1:0"\nforward = "127.0.0.1:9"\n'
                )
                with trio.fail_after(20):
                    checks = await trio.to_thread.run_sync(check_config, config)
            nursery.cancel_scope.cancel()
    finally:
        served.authority.close()
    found = {c.name: c for c in checks}
    assert "authority" not in found
    first, second = found["authority[0]"], found["authority[1]"]
    assert not first.ok and "connection refused" in first.detail and first.hint
    assert servers[0] in first.detail
    assert second.ok and servers[1] in second.detail
    assert "spiffe://example.org/meshid/authority" in second.detail
