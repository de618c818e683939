"""Management through the control plane: operators over mTLS, everyone else refused, all audited."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from ca_helpers import TD, run, serving_process, tls_exchange, wait_event

from ca.authority import Authority
from ca.store import DB_NAME
from meshid.clock import system_clock
from meshid.spiffeid import SpiffeId

ALICE = f"spiffe://{TD.name}/meshid/operator/alice"


def _setup(tmp_path: Path) -> tuple[Path, Path, Path]:
    state = tmp_path / "state"
    Authority.init(state, TD, clock=system_clock()).close()
    alice, web = tmp_path / "alice", tmp_path / "web"
    assert run("ca", "issue", ALICE, "--out", str(alice), "--state", str(state)).exit_code == 0
    assert run("ca", "issue", "/web", "--out", str(web), "--state", str(state)).exit_code == 0
    added = run("ca", "operator", "add", ALICE, "--state", str(state))
    assert added.exit_code == 0, added.output
    return state, alice, web


def _audit(state: Path) -> list[tuple[str, dict[str, object]]]:
    authority = Authority.open(state, clock=system_clock())
    try:
        return [(e.action, e.details) for e in authority.store.audit_entries()]
    finally:
        authority.close()


def test_operator_ids_are_the_one_reserved_shape_allowed(tmp_path: Path) -> None:
    state = tmp_path / "state"
    Authority.init(state, TD, clock=system_clock()).close()
    for bad in ("/meshid/authority", "/meshid/operator/a/b", "/meshid/operators/x"):
        refused = run("ca", "issue", bad, "--out", str(tmp_path / "x"), "--state", str(state))
        assert refused.exit_code != 0 and "reserved" in refused.output
    for bad in ("/web", "/meshid/authority"):
        refused = run("ca", "operator", "add", bad, "--state", str(state))
        assert refused.exit_code != 0
    assert run("ca", "operator", "add", ALICE, "--state", str(state)).exit_code == 0
    assert run("ca", "operator", "list", "--state", str(state)).output == ALICE + "\n"
    again = run("ca", "operator", "add", ALICE, "--state", str(state))
    assert again.exit_code != 0 and "already" in again.output
    assert run("ca", "operator", "remove", ALICE, "--state", str(state)).exit_code == 0
    assert run("ca", "operator", "list", "--state", str(state)).output == ""
    actions = [a for a, _ in _audit(state)]
    assert actions[-2:] == ["operator_add", "operator_remove"]


def test_operator_changes_policy_remotely_and_a_workload_is_refused(tmp_path: Path) -> None:
    state, alice, web = _setup(tmp_path)
    log = tmp_path / "log.jsonl"
    with serving_process(state, log) as proc:
        listen = str(wait_event(log, "serving", proc, 30)["listen"])
        as_alice = ("--server", listen, "--svid", str(alice))
        allowed = run("policy", "allow", "/web", "/api", *as_alice)
        assert allowed.exit_code == 0, allowed.output
        assert allowed.output.startswith(f"allowed spiffe://{TD.name}/web -> ")
        listed = run("policy", "list", *as_alice)
        assert listed.exit_code == 0, listed.output
        assert f"spiffe://{TD.name}/web -> spiffe://{TD.name}/api" in listed.stdout
        assert run("policy", "check", "/web", "/api", *as_alice).exit_code == 0
        assert run("policy", "check", "/api", "/web", *as_alice).exit_code == 1
        again = run("policy", "allow", "/web", "/api", *as_alice)
        assert again.exit_code == 0 and "nothing changed" in again.output
        assert run("policy", "deny", "/web", "/api", *as_alice).exit_code == 0
        revoked = run("ca", "revoke", "/db", *as_alice)
        assert revoked.exit_code == 0 and "revoked" in revoked.output
        # a workload's SVID is not an operator's
        refused = run("policy", "allow", "/web", "/db", "--server", listen, "--svid", str(web))
        assert refused.exit_code != 0
        assert "403" in refused.output and "operator list" in refused.output
        # an older client's call still works, and is audited the same way
        older = _older_client_call(listen, alice, b'{"action":"allow","from":"/cron","to":"/db"}')
        assert older.startswith(b"HTTP/1.1 200") and b"allowed spiffe://" in older
        assert run("policy", "deny", "/cron", "/db", *as_alice).exit_code == 0
        # both ways at once is a usage error
        both = run("policy", "list", "--state", str(state), *as_alice)
        assert both.exit_code == 2
        # no client certificate: not even authenticated
        port = int(listen.rpartition(":")[2])
        anonymous = tls_exchange(
            port,
            alice / "bundle.pem",
            b"POST /v1/admin/policy HTTP/1.1\r\nhost: ca\r\nconnection: close\r\n"
            b'content-length: 17\r\n\r\n{"action":"list"}',
        )
        assert anonymous.startswith(b"HTTP/1.1 401")
        # taken off the list, alice is refused from the next call on
        assert run("ca", "operator", "remove", ALICE, "--state", str(state)).exit_code == 0
        gone = run("policy", "list", *as_alice)
        assert gone.exit_code != 0 and "403" in gone.output
    rows = _audit(state)
    by_alice = [(a, d) for a, d in rows if d.get("operator") == ALICE]
    # each call is audited as it arrives; each change it makes names alice too
    assert [a for a, _ in by_alice] == [
        "operator_call",
        "policy_allow",
        "operator_call",  # list
        "operator_call",  # check
        "operator_call",  # check
        "operator_call",  # the allow that changed nothing
        "operator_call",
        "policy_deny",
        "operator_call",
        "revoke",
        "policy_allow",  # the older client's
        "operator_call",
        "policy_deny",
        "operator_call",  # refused, once off the list
    ]
    refusals = [d["operator"] for a, d in rows if a == "operator_call" and "refused" in d]
    assert refusals == [f"spiffe://{TD.name}/web", ALICE]
    # the remote pair never reached the allow-list
    authority = Authority.open(state, clock=system_clock())
    try:
        assert authority.policy().pairs == frozenset()
    finally:
        authority.close()


def _older_client_call(listen: str, svid: Path, body: bytes) -> bytes:
    """POST /v1/admin/policy as a client from before /v1/admin/run would."""
    request = (
        b"POST /v1/admin/policy HTTP/1.1\r\nhost: ca\r\nconnection: close\r\n"
        + f"content-length: {len(body)}\r\n\r\n".encode()
        + body
    )
    return tls_exchange(int(listen.rpartition(":")[2]), svid / "bundle.pem", request, svid)


def test_a_database_of_the_version_before_gains_the_operator_list(tmp_path: Path) -> None:
    state = tmp_path / "state"
    Authority.init(state, TD, clock=system_clock()).close()
    conn = sqlite3.connect(state / DB_NAME)
    with conn:
        conn.execute("DROP TABLE operators")
        conn.execute("UPDATE settings SET value = '4' WHERE name = 'schema_version'")
    conn.execute("PRAGMA user_version = 4")
    conn.close()
    authority = Authority.open(state, clock=system_clock())
    try:
        authority.operator_add(SpiffeId.parse(ALICE))
        assert authority.operators() == [SpiffeId.parse(ALICE)]
        assert authority.store.verify_audit()[1] is None
    finally:
        authority.close()


def test_the_client_talks_only_to_the_authority_itself(tmp_path: Path) -> None:
    import pytest
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    from ca.remote import _check_authority
    from meshid.errors import StateError

    _, _, web = _setup(tmp_path)
    leaf = x509.load_pem_x509_certificates((web / "svid.pem").read_bytes())[0]
    with pytest.raises(StateError, match="not the authority's identity"):
        _check_authority(leaf.public_bytes(Encoding.DER))
    with pytest.raises(StateError):
        _check_authority(None)
