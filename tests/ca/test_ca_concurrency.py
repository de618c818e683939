"""Several OS processes at one authority: SQLite's write lock serialises them.

Each child opens the authority, says "ready", and waits on stdin for the start
signal, so all of them act at the same moment with no sleeping anywhere.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from ca_helpers import MESHID, make_csr, query

from ca.authority import Authority

CHILD = """
import json, sys
from pathlib import Path
from ca.authority import Authority
from meshid.clock import system_clock
from meshid.errors import MeshIdError

state, action, *args = sys.argv[1:]
authority = Authority.open(Path(state), clock=system_clock())
print("ready", flush=True)
sys.stdin.readline()
try:
    if action == "enroll":
        issued = authority.enroll(args[0], Path(args[1]).read_bytes())
        result = {"ok": True, "serial": issued.leaf.serial_number}
    else:
        source, target = authority.resolve(args[0]), authority.resolve(args[1])
        result = {"ok": True, "version": authority.allow(source, target)}
except MeshIdError as exc:
    result = {"ok": False, "reason": exc.reason}
authority.close()
print(json.dumps(result), flush=True)
"""


BACKENDS = ("sqlite", "postgresql")  # every test here runs on both engines


def race(state: Path, *argvs: list[str]) -> list[dict[str, Any]]:
    """Run one child per argv, release them together, return their results."""
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, str(state), *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for argv in argvs
    ]
    try:
        for child in children:
            assert child.stdout is not None
            assert child.stdout.readline() == "ready\n"
        for child in children:
            assert child.stdin is not None
            child.stdin.write("go\n")
            child.stdin.flush()
        outputs = [child.communicate(timeout=60) for child in children]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.communicate()
    for child, (_, err) in zip(children, outputs, strict=True):
        assert child.returncode == 0, err
    return [json.loads(out) for out, _ in outputs]


def test_one_token_enrolls_exactly_once(authority: Authority, state: Path, tmp_path: Path) -> None:
    token = authority.create_token(authority.resolve("web"))
    csrs = []
    for i in range(4):
        path = tmp_path / f"csr-{i}.der"
        path.write_bytes(make_csr()[1])
        csrs.append(["enroll", token, str(path)])
    results = race(state, *csrs)
    assert sorted(r["ok"] for r in results) == [False, False, False, True]
    assert {r.get("reason") for r in results if not r["ok"]} == {"token_used"}
    assert query(state, "SELECT count(*) FROM svids WHERE how = 'enroll'") == [(1,)]
    assert authority.store.verify_audit()[1] is None


def test_the_same_allow_from_many_processes_lands_once(authority: Authority, state: Path) -> None:
    results = race(state, *[["allow", "web", "api"]] * 4)
    assert sorted(r["ok"] for r in results) == [False, False, False, True]
    assert {r.get("reason") for r in results if not r["ok"]} == {"already_allowed"}
    assert authority.policy().version == 1


def test_concurrent_allows_through_the_cli_each_raise_the_version_once(
    authority: Authority, state: Path
) -> None:
    targets = [f"api-{i}" for i in range(4)]
    children = [
        subprocess.Popen(
            [MESHID, "policy", "allow", "web", target, "--state", state],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for target in targets
    ]
    outputs = [child.communicate(timeout=60) for child in children]
    assert [child.returncode for child in children] == [0] * 4, outputs
    versions = sorted(int(out.rsplit("policy version ", 1)[1].rstrip(")\n")) for out, _ in outputs)
    assert versions == [1, 2, 3, 4]
    policy = authority.policy()
    assert policy.version == 4
    assert len(policy.pairs) == 4
    entries = [e for e in authority.store.audit_entries() if e.action == "policy_allow"]
    assert sorted(e.details["version"] for e in entries) == [1, 2, 3, 4]
    assert authority.store.verify_audit() == (5, None)
