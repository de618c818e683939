"""`meshid ca svid list [ID] [--json]`: issued SVIDs by serial, with the instance holding each."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

from ca_helpers import run
from cryptography import x509

from ca.store import DB_NAME


def _issue(state: Path, out: Path, name: str) -> str:
    result = run("ca", "issue", name, "--out", str(out), "--state", str(state))
    assert result.exit_code == 0, result.stderr
    leaf = x509.load_pem_x509_certificates((out / "svid.pem").read_bytes())[0]
    return f"{leaf.serial_number:x}"


def test_svid_list_json_names_each_svid_and_the_instance_holding_it(
    state: Path, tmp_path: Path
) -> None:
    web = _issue(state, tmp_path / "w", "web")
    api = _issue(state, tmp_path / "a", "api")
    conn = sqlite3.connect(state / DB_NAME)
    conn.execute(
        "INSERT INTO reports (spiffe_id, instance, seen_at, report) VALUES (?, ?, ?, ?)",
        (
            "spiffe://example.org/web",
            "w1",
            time.time(),
            json.dumps({"instance": "w1", "svid_serial": web}),
        ),
    )
    conn.commit()
    conn.close()
    result = run("ca", "svid", "list", "--json", "--state", str(state))
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    by_serial = {row["serial"]: row for row in doc["svids"]}
    assert set(by_serial) == {web, api}
    assert set(by_serial[web]) == {"id", "serial", "not_after", "issued_at", "how", "instance"}
    assert (by_serial[web]["id"], by_serial[web]["instance"]) == ("spiffe://example.org/web", "w1")
    assert by_serial[api]["instance"] is None
    only = run("ca", "svid", "list", "api", "--json", "--state", str(state))
    assert [row["serial"] for row in json.loads(only.stdout)["svids"]] == [api]
    text = run("ca", "svid", "list", "--state", str(state))
    assert text.exit_code == 0
    assert any(
        line.startswith(f"spiffe://example.org/web serial {web} ") and "[w1]" in line
        for line in text.stdout.splitlines()
    )
    assert "secret" not in text.stdout and "PRIVATE" not in text.stdout


def test_svid_list_of_a_bad_id_is_one_line(state: Path) -> None:
    result = run("ca", "svid", "list", "spiffe://other.org/x", "--state", str(state))
    assert result.exit_code != 0 and result.stderr.count("\n") == 1


# -- join tokens as objects -----------------------------------------------------


def test_token_list_shows_outstanding_tokens_but_never_the_token(state: Path) -> None:
    first = run("ca", "token", "--state", str(state), "web")  # options first still creates
    second = run("ca", "token", "api", "--ttl", "1h", "--state", str(state))
    assert first.exit_code == 0 and second.exit_code == 0
    tokens = [first.stdout.strip(), second.stdout.strip()]
    listed = run("ca", "token", "list", "--json", "--state", str(state))
    assert listed.exit_code == 0, listed.stderr
    doc = json.loads(listed.stdout)
    assert [t["id"] for t in doc["tokens"]] == [
        "spiffe://example.org/web",
        "spiffe://example.org/api",
    ]
    assert set(doc["tokens"][0]) == {"id", "created_at", "expires_at", "used", "used_at", "expired"}
    assert all(t["used"] is False and t["expired"] is False for t in doc["tokens"])
    text = run("ca", "token", "--state", str(state), "list")
    assert len(text.stdout.splitlines()) == 2
    for token in tokens:
        assert token not in listed.stdout and token not in text.stdout
        assert token[4:20] not in listed.stdout + text.stdout


def test_token_delete_removes_the_unused_tokens_of_an_id_and_is_audited(
    state: Path, tmp_path: Path
) -> None:
    from ca.authority import Authority
    from meshid.clock import system_clock

    assert run("ca", "token", "web", "--state", str(state)).exit_code == 0
    assert run("ca", "token", "api", "--state", str(state)).exit_code == 0
    result = run("ca", "token", "delete", "web", "--state", str(state))
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "deleted 1 unused token(s) of spiffe://example.org/web\n"
    doc = json.loads(run("ca", "token", "list", "--json", "--state", str(state)).stdout)
    assert [t["id"] for t in doc["tokens"]] == ["spiffe://example.org/api"]
    authority = Authority.open(state, clock=system_clock())
    try:
        assert authority.store.audit_entries()[-1].action == "token_delete"
    finally:
        authority.close()
    missing = run("ca", "token", "delete", "--state", str(state))
    assert missing.exit_code == 2 and missing.stderr.count("\n") == 1


def test_ca_status_json_is_one_document_with_the_documented_keys(
    state: Path, tmp_path: Path
) -> None:
    serial = _issue(state, tmp_path / "w", "web")
    conn = sqlite3.connect(state / DB_NAME)
    conn.execute(
        "INSERT INTO reports (spiffe_id, instance, seen_at, report) VALUES (?, ?, ?, ?)",
        (
            "spiffe://example.org/web",
            "w1",
            time.time(),
            json.dumps({"instance": "w1", "svid_serial": serial, "bundle_sequence": 0}),
        ),
    )
    conn.commit()
    conn.close()
    result = run("ca", "status", "--json", "--state", str(state))
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert set(doc) == {
        "trust_domain",
        "bundle_sequence",
        "policy_version",
        "revocation_version",
        "active_root",
        "warnings",
        "instances",
        "sidecars",
        "workloads",
    }
    assert doc["instances"] == []  # an embedded authority is no named instance
    assert doc["trust_domain"] == "example.org"
    assert [(s["id"], s["instance"], s["svid_serial"]) for s in doc["sidecars"]] == [
        ("spiffe://example.org/web", "w1", serial)
    ]
    assert doc["workloads"][0]["running"] is True
    assert any("holds bundle 0" in w for w in doc["warnings"])  # the text view's warnings
