"""`meshid doctor --state DIR`: one line per check, exit 1 when one fails, --json."""

from __future__ import annotations

import json
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ca_helpers import run, serving_process, snapshot, wait_event

from ca.store import DB_NAME


def _checks(state: Path) -> tuple[int, dict[str, dict[str, object]]]:
    result = run("doctor", "--state", str(state), "--json")
    doc = json.loads(result.stdout)
    assert set(doc) == {"ok", "checks"}
    assert doc["ok"] == (result.exit_code == 0)
    return result.exit_code, {c["name"]: c for c in doc["checks"]}


def test_a_fresh_authority_passes_every_check(state: Path) -> None:
    result = run("doctor", "--state", str(state))
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines and all(line.startswith("✓ ") for line in lines)
    code, checks = _checks(state)
    assert code == 0
    assert {"file_modes", "audit_chain", "root_expiry", "bundle_agreement"} <= set(checks)


def test_doctor_names_what_is_wrong_and_changes_nothing(state: Path) -> None:
    (state / "keys" / "root-1.key").chmod(0o644)
    run("policy", "allow", "web", "api", "--state", str(state))
    conn = sqlite3.connect(state / DB_NAME)
    conn.execute(
        "INSERT INTO reports (spiffe_id, instance, seen_at, report) VALUES (?, ?, ?, ?)",
        (
            "spiffe://example.org/web",
            "w1",
            time.time(),
            json.dumps({"instance": "w1", "bundle_sequence": 0}),
        ),
    )
    conn.commit()
    conn.close()
    before = snapshot(state)
    code, checks = _checks(state)
    assert code == 1
    assert checks["file_modes"]["ok"] is False and "root-1.key is 644" in str(
        checks["file_modes"]["detail"]
    )
    assert checks["bundle_agreement"]["ok"] is False
    assert checks["policy_identities"]["ok"] is False
    assert checks["audit_chain"]["ok"] is True
    assert all(c["hint"] for c in checks.values() if not c["ok"])
    text = run("doctor", "--state", str(state))
    assert any(
        line.startswith("✗ file_modes:") and "hint:" in line for line in text.stdout.splitlines()
    )
    assert snapshot(state) == before


def test_doctor_needs_exactly_one_target(tmp_path: Path) -> None:
    for args in ((), ("--state", str(tmp_path), "--config", str(tmp_path / "c.toml"))):
        result = run("doctor", *args)
        assert result.exit_code == 2 and result.stderr.count("\n") == 1
    missing = run("doctor", "--state", str(tmp_path / "nothing"))
    assert missing.exit_code == 1 and "✗" in missing.stdout


# -- a sidecar's config against a real, serving authority ---------------------------


def _sidecar_config(tmp_path: Path, state: Path, server: str) -> Path:
    (tmp_path / "side").mkdir(mode=0o700)
    config = tmp_path / "side" / "sidecar.toml"
    (tmp_path / "side" / "bundle.pem").write_bytes((state / "bundle.pem").read_bytes())
    config.write_text(
        'identity = "web"\ntrust_domain = "example.org"\n\n[authority]\n'
        f'server = "{server}"\nbundle = "bundle.pem"\ntoken_file = "web.token"\n'
        'state_dir = "st"\n\n[inbound]\nlisten = "127.0.0.1:0"\nforward = "127.0.0.1:9"\n'
    )
    (tmp_path / "side" / "web.token").write_text("mjt_x\n")
    return config


@contextmanager
def _served_sidecar_config(state: Path, tmp_path: Path) -> Iterator[Path]:
    """A sidecar config naming a real `ca serve` on `state`, served while in the block."""
    log = tmp_path / "serve.log"
    with serving_process(state, log) as proc:
        host, _, port = str(wait_event(log, "serving", proc, 30)["listen"]).rpartition(":")
        yield _sidecar_config(tmp_path, state, f"{host}:{port}")


def test_the_sidecar_doctor_reaches_the_authority_over_verified_tls(
    state: Path, tmp_path: Path
) -> None:
    with _served_sidecar_config(state, tmp_path) as config:
        result = run("doctor", "--config", str(config), "--json")
        assert result.exit_code == 0, result.stdout
        checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
        assert checks["authority"]["ok"] is True
        assert "spiffe://example.org/meshid/authority" in str(checks["authority"]["detail"])


def test_the_sidecar_doctor_names_a_server_that_does_not_speak_tls(tmp_path: Path) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        state = tmp_path / "state"
        assert (
            run("ca", "init", "--state", str(state), "--trust-domain", "example.org").exit_code == 0
        )
        config = _sidecar_config(tmp_path, state, f"127.0.0.1:{port}")

        def answer_plaintext() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

        thread = threading.Thread(target=answer_plaintext, daemon=True)
        thread.start()
        result = run("doctor", "--config", str(config))
        thread.join(timeout=10)
    assert result.exit_code == 1
    [line] = [line for line in result.stdout.splitlines() if line.startswith("✗ authority:")]
    assert "hint:" in line


def test_the_sidecar_doctor_judges_its_clock_against_the_authority(
    state: Path, tmp_path: Path
) -> None:
    from datetime import UTC, datetime, timedelta

    from meshid.clock import ManualClock
    from sidecar.doctor import check_config

    with _served_sidecar_config(state, tmp_path) as config:
        ahead = ManualClock(datetime.now(UTC) + timedelta(minutes=10))
        checks = {c.name: c for c in check_config(config, clock=ahead)}
        in_sync = {c.name: c for c in check_config(config, clock=ManualClock())}
    assert checks["authority"].ok
    skew = checks["clock_skew"]
    assert skew.ok is False and skew.hint and "+5" in skew.detail  # about +600s
    assert skew.data is not None and skew.data["limit_seconds"] == 30
    assert 590 < float(str(skew.data["skew_seconds"])) <= 600
    assert in_sync["clock_skew"].ok is True and "30s" in in_sync["clock_skew"].detail
