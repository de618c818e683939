"""`meshid policy list` a page at a time: --limit and --after, locally and over the control plane.

The authority answers `list` in pages of at most MAX_PAGE rules with a cursor
for the next; the CLI asks for PAGE at a time and prints as it goes, so a
long allow-list is never one answer nor one list in memory.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ca_helpers import TD, run, serving_process, wait_event

import ca.policy_cli
from ca.authority import Authority
from meshid.adminwire import MAX_PAGE, AdminAnswer, PolicyCall
from meshid.clock import system_clock
from meshid.errors import InvalidInput

ALICE = f"spiffe://{TD.name}/meshid/operator/alice"
RULES = sorted(
    [(f"spiffe://{TD.name}/a{i:02d}", f"spiffe://{TD.name}/b") for i in range(23)]
    + [(f"spiffe://{TD.name}/ns/x/*", f"spiffe://{TD.name}/b")]
)
LINES = [f"{s} -> {t}" for s, t in RULES]


@pytest.fixture
def listed_state(tmp_path: Path) -> Path:
    state = tmp_path / "state"
    authority = Authority.init(state, TD, clock=system_clock())
    authority.apply_policy(RULES)
    authority.close()
    return state


def _list(*args: str) -> tuple[int, list[str], str]:
    result = run("policy", "list", *args)
    return result.exit_code, result.stdout.splitlines(), result.stderr


def _pages_of(monkeypatch: pytest.MonkeyPatch, size: int) -> None:
    monkeypatch.setattr(ca.policy_cli, "PAGE", size)


def test_a_local_list_pages_through_every_rule_in_order(
    listed_state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _pages_of(monkeypatch, 5)
    code, lines, err = _list("--state", str(listed_state))
    assert (code, lines) == (0, LINES)
    assert err == "# policy version 1, 24 pair(s)\n"
    code, lines, err = _list("--state", str(listed_state), "--limit", "7")
    assert (code, lines) == (0, LINES[:7])
    assert f"# more: --after '{LINES[6]}'" in err
    code, lines, err = _list("--state", str(listed_state), "--after", LINES[6], "--limit", "100")
    assert (code, lines) == (0, LINES[7:])
    assert "# more" not in err
    listed = run("policy", "list", "--state", str(listed_state), "--json")
    doc = json.loads(listed.stdout)
    assert doc == {"version": 1, "pairs": [{"from": s, "to": t} for s, t in RULES]}


def test_a_bad_cursor_is_a_usage_error_naming_the_option(listed_state: Path) -> None:
    result = run("policy", "list", "--state", str(listed_state), "--after", "nonsense")
    assert result.exit_code == 2 and "--after" in result.output
    result = run("policy", "list", "--state", str(listed_state), "--limit", "0")
    assert result.exit_code == 2 and "--limit" in result.output


def test_the_wire_pages_carry_their_cursor_and_refuse_a_bad_one() -> None:
    call = PolicyCall("list", after=("a", "b"), limit=10)
    assert PolicyCall.parse(call.to_json()) == call
    assert PolicyCall.parse({"action": "list"}) == PolicyCall("list")  # an older CLI
    answer = AdminAnswer(True, ("x",), ("a", "b"))
    assert AdminAnswer.parse(answer.to_json()) == answer
    assert AdminAnswer.parse({"ok": True, "lines": []}).next is None  # an older authority
    for bad in ({"after": ["a"]}, {"after": "a -> b"}, {"limit": 0}, {"limit": True}):
        with pytest.raises(InvalidInput):
            PolicyCall.parse({"action": "list", **bad})


def test_an_operator_lists_page_by_page_through_the_control_plane(
    listed_state: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice = tmp_path / "alice"
    issued = run("ca", "issue", ALICE, "--out", str(alice), "--state", str(listed_state))
    assert issued.exit_code == 0, issued.output
    assert run("ca", "operator", "add", ALICE, "--state", str(listed_state)).exit_code == 0
    log = tmp_path / "log.jsonl"
    _pages_of(monkeypatch, 10)
    with serving_process(listed_state, log) as proc:
        listen = str(wait_event(log, "serving", proc, 30)["listen"])
        as_alice = ("--server", listen, "--svid", str(alice))
        code, lines, err = _list(*as_alice)
        assert (code, lines) == (0, LINES)  # three pages, prefix rules included
        assert err == "# policy version 1, 24 pair(s)\n"
        code, lines, err = _list(*as_alice, "--limit", "4", "--after", LINES[1])
        assert (code, lines) == (0, LINES[2:6])
        assert f"# more: --after '{LINES[5]}'" in err
    authority = Authority.open(listed_state, clock=system_clock())
    try:
        calls = [e for e in authority.store.audit_entries() if e.action == "operator_call"]
    finally:
        authority.close()
    # One row per listing, not per page.
    assert [c.details.get("command") for c in calls] == ["policy list", "policy list"]
    assert MAX_PAGE >= 1000
