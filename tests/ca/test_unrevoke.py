"""`meshid ca unrevoke ID`: a revocation can be lifted, audited, and the feed says so."""

from __future__ import annotations

from pathlib import Path

from ca_helpers import run, snapshot

from ca.authority import Authority
from meshid.clock import system_clock
from meshid.spiffeid import SpiffeId

WEB = SpiffeId.parse("spiffe://example.org/web")

BACKENDS = ("sqlite", "postgresql")  # every test here runs on both engines


def test_unrevoke_lifts_the_revocation_and_bumps_the_version(state: Path, tmp_path: Path) -> None:
    assert run("ca", "revoke", "web", "--state", str(state)).exit_code == 0
    refused = run("ca", "issue", "web", "--out", str(tmp_path / "a"), "--state", str(state))
    assert refused.exit_code != 0
    result = run("ca", "unrevoke", "web", "--state", str(state))
    assert result.exit_code == 0, result.stderr
    assert result.stdout == f"unrevoked {WEB} (revocation version 2)\n"
    authority = Authority.open(state, clock=system_clock())
    try:
        assert authority.policy().revoked == frozenset()
        feed = authority.feed(WEB)
        assert (feed["revoked"], feed["revocation_version"]) == ([], 2)
        assert authority.store.audit_entries()[-1].action == "unrevoke"
    finally:
        authority.close()
    issued = run("ca", "issue", "web", "--out", str(tmp_path / "b"), "--state", str(state))
    assert issued.exit_code == 0, issued.stderr


def test_unrevoke_of_an_identity_not_revoked_changes_nothing(state: Path) -> None:
    before = snapshot(state)
    result = run("ca", "unrevoke", "web", "--state", str(state))
    assert result.exit_code == 0
    assert result.stdout == f"{WEB} was not revoked; nothing changed\n"
    assert snapshot(state) == before
