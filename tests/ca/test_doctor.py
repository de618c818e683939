"""`meshid doctor --state DIR`: one line per check, exit 1 when one fails, --json."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

from ca_helpers import run, snapshot

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
