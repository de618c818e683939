"""The audit chain: one row per action, and tampering shows."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
from ca_helpers import make_csr, run

from ca.authority import Authority
from ca.store import DB_NAME
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
    authority = Authority.open(state)
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
