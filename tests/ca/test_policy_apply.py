"""`meshid policy apply -f FILE` / `policy export`: the allow-list as code.

Apply makes the list equal to the file in one change (one version, one audit
row), prints the diff, and is a no-op when nothing differs; export writes a
file that apply takes back unchanged. `--dry-run` changes nothing and lists
the live connections the removals would cut, from the sidecars' reports.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

from ca_helpers import run, snapshot

from ca.authority import Authority
from ca.store import DB_NAME
from meshid.clock import system_clock
from meshid.spiffeid import SpiffeId

TD = "example.org"
WEB = SpiffeId.parse("spiffe://example.org/web")
API = SpiffeId.parse("spiffe://example.org/api")
OLD = SpiffeId.parse("spiffe://example.org/old")
DB = SpiffeId.parse("spiffe://example.org/db")


def _open(state: Path) -> Authority:
    return Authority.open(state, clock=system_clock())


def _version_and_audit(state: Path) -> tuple[int, list[str]]:
    authority = _open(state)
    try:
        return authority.policy().version, [e.action for e in authority.store.audit_entries()]
    finally:
        authority.close()


def _write(tmp_path: Path, *pairs: tuple[str, str], name: str = "policy.toml") -> Path:
    path = tmp_path / name
    body = "".join(f'[[allow]]\nfrom = "{s}"\nto = "{t}"\n\n' for s, t in pairs)
    path.write_text(body)
    return path


def _apply(state: Path, path: Path, *extra: str) -> tuple[int, str, str]:
    result = run("policy", "apply", "-f", str(path), "--state", str(state), *extra)
    return result.exit_code, result.stdout, result.stderr


def test_apply_makes_the_list_equal_to_the_file_and_prints_the_diff(
    state: Path, tmp_path: Path
) -> None:
    authority = _open(state)
    authority.allow(OLD, API)
    authority.allow(API, DB)
    authority.close()
    path = _write(tmp_path, ("web", "api"), ("api", "db"))
    code, out, err = _apply(state, path)
    assert code == 0, err
    assert out.splitlines() == [
        f"+ {WEB} -> {API}",
        f"- {OLD} -> {API}",
        f"applied {path}: 1 added, 1 removed (policy version 3)",
    ]
    authority = _open(state)
    try:
        assert authority.policy().pairs == {(WEB, API), (API, DB)}
        entry = authority.store.audit_entries()[-1]
        assert entry.action == "policy_apply"
    finally:
        authority.close()


def test_applying_the_same_file_again_changes_nothing(state: Path, tmp_path: Path) -> None:
    path = _write(tmp_path, ("web", "api"))
    assert _apply(state, path)[0] == 0
    before = _version_and_audit(state)
    code, out, _ = _apply(state, path)
    assert code == 0
    assert out == f"the allow-list already matches {path} (policy version 1); nothing changed\n"
    assert _version_and_audit(state) == before == (1, before[1])


def test_export_then_apply_is_a_no_op(state: Path, tmp_path: Path) -> None:
    authority = _open(state)
    for pair in ((WEB, API), (API, DB), (OLD, DB)):
        authority.allow(*pair)
    authority.close()
    exported = run("policy", "export", "--state", str(state))
    assert exported.exit_code == 0
    assert exported.stdout.startswith("# meshid allow-list, policy version 3\n")
    path = tmp_path / "exported.toml"
    path.write_text(exported.stdout)
    before = snapshot(state)
    code, out, _ = _apply(state, path)
    assert code == 0 and "nothing changed" in out
    assert snapshot(state) == before


def test_an_empty_file_removes_every_pair(state: Path, tmp_path: Path) -> None:
    authority = _open(state)
    authority.allow(WEB, API)
    authority.close()
    path = tmp_path / "empty.toml"
    path.write_text("")
    code, out, _ = _apply(state, path)
    assert code == 0 and out.startswith(f"- {WEB} -> {API}\n")
    assert _version_and_audit(state)[0] == 2


def test_dry_run_lists_the_diff_and_the_cuts_and_changes_nothing(
    state: Path, tmp_path: Path
) -> None:
    authority = _open(state)
    authority.allow(WEB, API)
    authority.close()
    report = {
        "instance": "w1",
        "pairs": [{"direction": "outbound", "peer_id": str(API), "count": 2}],
    }
    conn = sqlite3.connect(state / DB_NAME)
    conn.execute(
        "INSERT INTO reports (spiffe_id, instance, seen_at, report) VALUES (?, ?, ?, ?)",
        (str(WEB), "w1", time.time(), json.dumps(report)),
    )
    conn.commit()
    conn.close()
    path = _write(tmp_path, ("api", "db"))
    before = snapshot(state)
    code, out, err = _apply(state, path, "--dry-run")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[:2] == [f"+ {API} -> {DB}", f"- {WEB} -> {API}"]
    assert "would cut 2 live connection(s)" in lines[2]
    assert "nothing was changed" in lines[2]
    assert snapshot(state) == before


def test_a_bad_file_is_one_line_and_changes_nothing(state: Path, tmp_path: Path) -> None:
    authority = _open(state)
    authority.allow(WEB, API)
    authority.close()
    before = snapshot(state)
    cases = {
        "typo.toml": '[[allow]]\nform = "web"\nto = "api"\n',
        "bad.toml": "[[allow]\n",
        "id.toml": '[[allow]]\nfrom = "spiffe://other.org/web"\nto = "api"\n',
        "top.toml": '[[alow]]\nfrom = "web"\nto = "api"\n',
        "reserved.toml": '[[allow]]\nfrom = "web"\nto = "meshid/authority"\n',
    }
    for name, text in cases.items():
        path = tmp_path / name
        path.write_text(text)
        code, out, err = _apply(state, path)
        assert code != 0, name
        assert out == "" and err.count("\n") == 1 and "Traceback" not in err, (name, err)
    code, _, err = _apply(state, tmp_path / "missing.toml")
    assert code != 0 and err.count("\n") == 1
    assert snapshot(state) == before


# -- machine-readable output ------------------------------------------------------


def test_policy_list_json_is_one_document(state: Path) -> None:
    authority = _open(state)
    authority.allow(WEB, API)
    authority.allow(API, DB)
    authority.close()
    result = run("policy", "list", "--json", "--state", str(state))
    assert result.exit_code == 0
    doc = json.loads(result.stdout)
    assert doc == {
        "version": 2,
        "pairs": [{"from": str(API), "to": str(DB)}, {"from": str(WEB), "to": str(API)}],
    }


def test_policy_check_json_keeps_the_exit_status(state: Path) -> None:
    authority = _open(state)
    authority.allow(WEB, API)
    authority.close()
    allowed = run("policy", "check", "web", "api", "--json", "--state", str(state))
    denied = run("policy", "check", "api", "web", "--json", "--state", str(state))
    assert (allowed.exit_code, denied.exit_code) == (0, 1)
    yes, no = json.loads(allowed.stdout), json.loads(denied.stdout)
    assert set(yes) == {"from", "to", "allowed", "reason", "version", "explanation"}
    assert (yes["allowed"], yes["reason"], yes["version"]) == (True, "allowed", 1)
    assert (no["allowed"], no["reason"], no["from"]) == (False, "not_allowed", str(API))


# -- prefix rules ---------------------------------------------------------------


def test_prefix_rules_apply_list_export_and_check_naming_the_rule(
    state: Path, tmp_path: Path
) -> None:
    path = _write(tmp_path, ("ns/prod/*", "db"), ("ns/prod/sa/web", "db"))
    code, out, err = _apply(state, path)
    assert code == 0, err
    assert "+ spiffe://example.org/ns/prod/* -> spiffe://example.org/db" in out
    listed = json.loads(run("policy", "list", "--json", "--state", str(state)).stdout)
    assert {"from": "spiffe://example.org/ns/prod/*", "to": str(DB)} in listed["pairs"]
    by_prefix = run("policy", "check", "ns/prod/jobs/etl", "db", "--state", str(state))
    assert by_prefix.exit_code == 0
    assert "rule spiffe://example.org/ns/prod/* -> spiffe://example.org/db" in by_prefix.stdout
    exact = run("policy", "check", "ns/prod/sa/web", "db", "--state", str(state))
    assert "rule spiffe://example.org/ns/prod/sa/web -> spiffe://example.org/db" in exact.stdout
    assert run("policy", "check", "ns/production/x", "db", "--state", str(state)).exit_code == 1
    exported = tmp_path / "exported.toml"
    exported.write_text(run("policy", "export", "--state", str(state)).stdout)
    before = snapshot(state)
    assert "nothing changed" in _apply(state, exported)[1]
    assert snapshot(state) == before
    # allow and deny take prefixes too
    assert run("policy", "allow", "web", "ns/shared/*", "--state", str(state)).exit_code == 0
    denied = run("policy", "deny", "ns/prod/*", "db", "--state", str(state))
    assert denied.exit_code == 0 and denied.stdout.startswith("denied ")
    assert run("policy", "check", "ns/prod/jobs/etl", "db", "--state", str(state)).exit_code == 1


def test_the_feed_carries_the_prefix_rules_that_can_match_the_sidecar(state: Path) -> None:
    from meshid.feedwire import Feed

    authority = _open(state)
    try:
        authority.allow("spiffe://example.org/ns/prod/*", str(DB))
        authority.allow(str(WEB), "spiffe://example.org/ns/other/*")
        prod = Feed.parse(authority.feed(SpiffeId.parse("spiffe://example.org/ns/prod/sa/x")))
        db = Feed.parse(authority.feed(DB))
        api = Feed.parse(authority.feed(API))
    finally:
        authority.close()
    rule = ("spiffe://example.org/ns/prod/*", str(DB))
    assert prod.prefix_rules == (rule,) and db.prefix_rules == (rule,)
    assert api.prefix_rules == ()
    assert Feed.parse(prod.to_json()) == prod


def test_dry_run_of_removing_a_prefix_counts_the_pairs_it_alone_allowed(
    state: Path, tmp_path: Path
) -> None:
    etl = "spiffe://example.org/ns/prod/etl"
    authority = _open(state)
    authority.allow("spiffe://example.org/ns/prod/*", str(DB))
    authority.close()
    report = {
        "instance": "e1",
        "pairs": [{"direction": "outbound", "peer_id": str(DB), "count": 3}],
    }
    conn = sqlite3.connect(state / DB_NAME)
    conn.execute(
        "INSERT INTO reports (spiffe_id, instance, seen_at, report) VALUES (?, ?, ?, ?)",
        (etl, "e1", time.time(), json.dumps(report)),
    )
    conn.commit()
    conn.close()
    code, out, _ = _apply(state, _write(tmp_path), "--dry-run")
    assert code == 0 and "would cut 3 live connection(s)" in out
    deny = run("policy", "deny", "ns/prod/*", "db", "--dry-run", "--state", str(state))
    assert "would cut 3 live connection(s)" in deny.stdout
