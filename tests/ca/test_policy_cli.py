"""`meshid policy allow/deny` as operators use them: idempotent, and loud about likely typos.

A repeated allow or a deny of a pair not on the list is a no-op that
succeeds: no new policy version (each one wakes every sidecar) and no audit
row. A name the authority never issued anything to is accepted (policy may
come before the workload) with a warning on stderr.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from ca_helpers import MESHID, run

from ca.authority import Authority
from meshid.clock import system_clock

WEB = "spiffe://example.org/web"
API = "spiffe://example.org/api"


def _versions_and_audit(state: Path) -> tuple[int, int]:
    authority = Authority.open(state, clock=system_clock())
    try:
        return authority.policy().version, len(list(authority.store.audit_entries()))
    finally:
        authority.close()


def _introduce(state: Path, *names: str) -> None:
    for name in names:
        assert run("ca", "token", "--state", str(state), name).exit_code == 0


def test_allow_of_a_never_enrolled_identity_warns_naming_it(state: Path) -> None:
    _introduce(state, "web", "api")
    result = run("policy", "allow", "web", "apii", "--state", str(state))
    assert result.exit_code == 0, result.stderr
    assert result.stdout == f"allowed {WEB} -> {API}i (policy version 1)\n"
    assert result.stderr == (
        f"warning: {API}i has never been enrolled or issued; check the spelling\n"
    )


def test_allow_of_known_identities_warns_nothing(state: Path, tmp_path: Path) -> None:
    _introduce(state, "web")  # a join token counts; so does an SVID issued offline
    assert (
        run("ca", "issue", "--state", str(state), "api", "--out", str(tmp_path / "o")).exit_code
        == 0
    )
    result = run("policy", "allow", "web", "api", "--state", str(state))
    assert result.exit_code == 0 and result.stderr == ""


def test_allow_twice_succeeds_and_changes_nothing(state: Path) -> None:
    _introduce(state, "web", "api")
    assert run("policy", "allow", "web", "api", "--state", str(state)).exit_code == 0
    before = _versions_and_audit(state)
    again = subprocess.run(
        [MESHID, "policy", "allow", "web", "api", "--state", str(state)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 0, again.stderr
    assert (
        again.stdout == f"{WEB} -> {API} was already allowed (policy version 1); nothing changed\n"
    )
    assert again.stderr == ""
    assert _versions_and_audit(state) == before == (1, before[1])


def test_deny_of_a_pair_not_allowed_succeeds_and_changes_nothing(state: Path) -> None:
    _introduce(state, "web", "api")
    before = _versions_and_audit(state)
    for extra in ((), ("--dry-run",)):
        result = run("policy", "deny", "web", "api", "--state", str(state), *extra)
        assert result.exit_code == 0, result.stderr
        assert result.stderr == ""
        assert "was not allowed (policy version 0)" in result.stdout
        assert _versions_and_audit(state) == before
    assert "denying it would change nothing" in result.stdout  # the dry run says so


def test_deny_of_an_allowed_pair_still_bumps_the_version(state: Path) -> None:
    _introduce(state, "web", "api")
    assert run("policy", "allow", "web", "api", "--state", str(state)).exit_code == 0
    result = run("policy", "deny", "web", "api", "--state", str(state))
    assert result.exit_code == 0
    assert result.stdout == f"denied {WEB} -> {API} (policy version 2)\n"
    assert _versions_and_audit(state)[0] == 2
    # and a deny of a typo says which name is unknown
    typo = run("policy", "deny", "wbe", "api", "--state", str(state))
    assert typo.exit_code == 0 and "was not allowed" in typo.stdout
    assert "spiffe://example.org/wbe has never been enrolled or issued" in typo.stderr
