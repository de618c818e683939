"""The audit chain: one row per action, and tampering shows."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
from ca_helpers import make_csr, query, rechain, run

from ca.audit import AUDIT_HEAD, AUDIT_KEY
from ca.authority import Authority
from ca.store import DB_NAME, Store
from meshid.clock import system_clock
from meshid.errors import PolicyError
from meshid.svid import generate_key


def _actions(authority: Authority) -> list[str]:
    return [entry.action for entry in authority.store.audit_entries()]


def test_every_action_adds_one_audit_row(authority: Authority) -> None:
    web, api = authority.resolve("web"), authority.resolve("api")
    steps: list[tuple[str, Callable[[], object]]] = [
        ("issue", lambda: authority.issue(web, generate_key().public_key())),
        ("token", lambda: authority.create_token(api)),
        ("enroll", lambda: authority.enroll(authority.create_token(web), make_csr()[1])),
        ("policy_allow", lambda: authority.allow(web, api)),
        ("policy_deny", lambda: authority.deny(web, api)),
        ("revoke", lambda: authority.revoke(api)),
    ]
    assert _actions(authority) == ["init"]
    expected = ["init"]
    for action, step in steps:
        step()
        expected += ["token", action] if action == "enroll" else [action]
        assert _actions(authority) == expected
    assert authority.store.verify_audit() == (len(expected), None)


def test_refused_actions_add_no_row(authority: Authority) -> None:
    web, api = authority.resolve("web"), authority.resolve("api")
    authority.allow(web, api)
    before = _actions(authority)
    with pytest.raises(PolicyError):
        authority.allow(web, api)
    with pytest.raises(PolicyError):
        authority.deny(api, web)
    assert _actions(authority) == before


def test_audit_rows_hold_no_token(authority: Authority) -> None:
    token = authority.create_token(authority.resolve("web"))
    (entry,) = [e for e in authority.store.audit_entries() if e.action == "token"]
    assert token not in repr(entry)
    assert entry.details["spiffe_id"] == "spiffe://example.org/web"


def _tamper(state: Path, sql: str) -> None:
    conn = sqlite3.connect(state / DB_NAME)
    try:
        conn.execute(sql)
        conn.commit()
    finally:
        conn.close()


@pytest.mark.parametrize(
    ("sql", "broken_at", "what"),
    [
        ("UPDATE audit SET details = replace(details, 'web', 'evil') WHERE seq = 2", 2, "modified"),
        ("UPDATE audit SET action = 'policy_deny' WHERE seq = 3", 3, "modified"),
        ("UPDATE audit SET at = at + 1 WHERE seq = 1", 1, "modified"),
        ("DELETE FROM audit WHERE seq = 2", 3, "missing"),
    ],
    ids=["details", "action", "time", "deleted row"],
)
def test_tampering_is_detected(
    state: Path, authority: Authority, sql: str, broken_at: int, what: str
) -> None:
    authority.allow(authority.resolve("web"), authority.resolve("api"))
    authority.allow(authority.resolve("api"), authority.resolve("db"))
    assert authority.store.verify_audit() == (3, None)  # positive twin
    _tamper(state, sql)
    seq, problem = authority.store.verify_audit()
    assert seq == broken_at
    assert problem is not None and what in problem


def test_cli_actions_are_audited_too(state: Path, tmp_path: Path) -> None:
    s = str(state)
    assert run("ca", "issue", "--state", s, "web", "--out", str(tmp_path / "out")).exit_code == 0
    assert run("ca", "token", "--state", s, "api").exit_code == 0
    assert run("policy", "allow", "web", "api", "--state", s).exit_code == 0
    assert run("policy", "deny", "web", "api", "--state", s).exit_code == 0
    assert run("ca", "revoke", "--state", s, "api").exit_code == 0
    authority = Authority.open(state, clock=system_clock())
    try:
        assert _actions(authority) == [
            "init",
            "issue",
            "token",
            "policy_allow",
            "policy_deny",
            "revoke",
        ]
        assert authority.store.verify_audit() == (6, None)
    finally:
        authority.close()


# -- the keyed chain: what someone who can write the database but not the key can do --


def _three_rows(state: Path) -> None:
    authority = Authority.open(state, clock=system_clock())
    try:
        authority.allow(authority.resolve("web"), authority.resolve("api"))
        authority.allow(authority.resolve("api"), authority.resolve("db"))
        assert authority.store.verify_audit() == (3, None)
    finally:
        authority.close()


def _verify(state: Path) -> tuple[int, str | None]:
    store = Store.open(state / DB_NAME, clock=system_clock())
    try:
        return store.verify_audit()
    finally:
        store.close()


def test_an_edit_with_every_later_hash_recomputed_is_caught(state: Path) -> None:
    _three_rows(state)
    rechain(state, "UPDATE audit SET details = replace(details, 'web', 'evil') WHERE seq = 2")
    seq, problem = _verify(state)
    assert seq == 1 and problem == "entry 1 was modified"  # the first row re-linked is caught
    result = run("ca", "audit", "verify", "--state", str(state))
    assert result.exit_code == 1
    assert result.stderr.strip() == "Error: audit log tampered: entry 1 was modified"


def test_cutting_off_the_newest_entries_is_caught(state: Path) -> None:
    _three_rows(state)
    _tamper(state, "DELETE FROM audit WHERE seq >= 2")
    seq, problem = _verify(state)
    assert seq == 2
    assert problem == "entries 2 to 3 are missing: the log was cut short"


def test_a_missing_chain_head_is_caught(state: Path) -> None:
    _three_rows(state)
    (state / AUDIT_HEAD).unlink()
    assert _verify(state)[1] == f"the chain head record {AUDIT_HEAD} is missing"


def test_key_and_head_are_private_files_outside_the_database(state: Path) -> None:
    for name in (AUDIT_KEY, AUDIT_HEAD):
        assert (state / name).stat().st_mode & 0o777 == 0o600
    key = json.loads((state / AUDIT_KEY).read_text())
    assert key["keyed_from"] == 1 and len(bytes.fromhex(key["key"])) == 32
    assert key["key"] not in "\n".join(str(r) for r in query(state, "SELECT * FROM settings"))


def _make_unkeyed(state: Path) -> None:
    """What a database from before the audit key looked like: plain SHA-256 links, no files."""
    rechain(state)
    (state / AUDIT_KEY).unlink()
    (state / AUDIT_HEAD).unlink()
    _tamper(state, "PRAGMA user_version = 2")


def test_an_unkeyed_chain_is_migrated_and_pinned(state: Path) -> None:
    _three_rows(state)
    _make_unkeyed(state)
    authority = Authority.open(state, clock=system_clock())  # the migration
    try:
        assert _actions(authority)[-1] == "audit_keyed"
        assert authority.store.verify_audit() == (4, None)
        authority.revoke(authority.resolve("db"))
        assert authority.store.verify_audit() == (5, None)
    finally:
        authority.close()
    assert json.loads((state / AUDIT_KEY).read_text())["keyed_from"] == 4
    # an edit of an old, unkeyed row with its links recomputed is caught at the first MAC
    rechain(state, "UPDATE audit SET details = replace(details, 'web', 'evil') WHERE seq = 2", 3)
    assert _verify(state) == (4, "entry 4 does not follow entry 3")


def test_rolling_the_schema_back_does_not_unkey_the_chain(state: Path) -> None:
    _three_rows(state)
    rechain(state, "UPDATE audit SET details = replace(details, 'web', 'evil') WHERE seq = 2")
    _tamper(state, "PRAGMA user_version = 2")  # pretend the key never existed
    Store.open(
        state / DB_NAME, clock=system_clock()
    ).close()  # "migrates" again: the key file is kept
    assert _verify(state)[1] == "entry 1 was modified"
