"""The authority's answers that must not read the whole allow-list: a check, a caller's revocation.

`policy check` and every authenticated request (is the caller revoked?) look
up the few rows that can matter, so they cost the same with 100,000 rules as
with 10; their answers must be exactly those of the whole `Policy`.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from ca.authority import Authority
from ca.store import DB_NAME
from meshid.spiffeid import SpiffeId

TD = "spiffe://example.org"
WEB = SpiffeId.parse(f"{TD}/ns/prod/sa/web")
API = SpiffeId.parse(f"{TD}/ns/prod/sa/api")
DB = SpiffeId.parse(f"{TD}/ns/data/sa/db")
CACHE = SpiffeId.parse(f"{TD}/ns/data/sa/cache/x")


def test_a_check_decides_as_the_whole_policy_does(authority: Authority) -> None:
    authority.allow(WEB, API)
    authority.allow(f"{TD}/ns/prod/*", DB)
    authority.allow(f"{TD}/ns/prod/sa/*", f"{TD}/ns/data/*")
    authority.allow(API, f"{TD}/ns/data/sa/cache/*")
    authority.revoke(SpiffeId.parse(f"{TD}/ns/prod/sa/gone"))
    ids = [WEB, API, DB, CACHE, SpiffeId.parse(f"{TD}/ns/prod/sa/gone")]
    whole = authority.policy()
    for source in ids:
        for target in ids:
            assert authority.check(source, target) == whole.decide(source, target)


def test_a_check_reads_only_the_rows_that_can_match(authority: Authority, state: Path) -> None:
    authority.allow(WEB, API)
    with sqlite3.connect(state / DB_NAME) as conn:
        conn.executemany(
            "INSERT INTO policy (source, target, created_at) VALUES (?, ?, 0)",
            [(f"{TD}/ns/n{i}/sa/s{i}", f"{TD}/ns/n{i}/sa/t{i}") for i in range(100_000)],
        )
    plans = []
    authority.store._conn.raw.set_trace_callback(plans.append)
    try:
        assert authority.check(WEB, API).allowed
        assert not authority.check(API, WEB).allowed
        assert authority.revocation(WEB) is None
    finally:
        authority.store._conn.raw.set_trace_callback(None)
    reads = [p for p in plans if "FROM policy" in p]
    assert reads and all("WHERE" in p for p in reads)


def test_a_revoked_caller_is_found_with_the_revocation_version(authority: Authority) -> None:
    assert authority.revocation(WEB) is None
    version = authority.revoke(WEB)
    assert authority.revocation(WEB) == version
    authority.revoke(API)
    assert authority.revocation(WEB) == version + 1  # the version in force, as before
