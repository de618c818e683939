"""Records of SVIDs that expired more than a day ago are pruned, in small batches.

Nothing can use such a certificate, and revoking its serial changes nothing;
keeping every record would let the `svids` table grow with every renewal
forever. Each identity's newest record is kept whatever its age, so
`ca status` still lists every identity ever issued, with its latest expiry.
"""

from __future__ import annotations

import sqlite3
import threading
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest
import trio
from ca_helpers import Clock, query

from ca import backend
from ca.authority import Authority
from ca.issuance import SVID_RETENTION
from ca.schema import SCHEMA_VERSION
from ca.store import DB_NAME
from meshid.errors import PolicyError
from meshid.ratelimit import TokenBucket
from meshid.spiffeid import SpiffeId
from meshid.svid import generate_key

BACKENDS = ("sqlite", "postgresql")  # every test here runs on both engines

WEB = SpiffeId.parse("spiffe://example.org/web")
API = SpiffeId.parse("spiffe://example.org/api")
HOUR = timedelta(hours=1)


def _issue(authority: Authority, sid: SpiffeId) -> str:
    leaf = authority.issue(sid, generate_key().public_key(), ttl=HOUR).leaf
    return f"{leaf.serial_number:x}"


def _serials(state: Path) -> set[str]:
    return {str(row[0]) for row in query(state, "SELECT serial FROM svids")}


def test_only_records_expired_long_ago_are_pruned(
    authority: Authority, clock: Clock, state: Path
) -> None:
    web_old, api_only = _issue(authority, WEB), _issue(authority, API)
    clock.advance(timedelta(hours=23))
    web_recent = _issue(authority, WEB)  # expires an hour before the next one is made
    clock.advance(2 * HOUR + timedelta(minutes=1))
    web_valid = _issue(authority, WEB)
    # web_old and api_only expired 24 h 1 min ago; web_recent 1 min ago
    audit_before = query(state, "SELECT COUNT(*) FROM audit")[0][0]
    assert authority.prune_svids() == 1
    assert _serials(state) == {api_only, web_recent, web_valid}  # api's one record is its newest
    assert authority.prune_svids() == 0
    assert query(state, "SELECT COUNT(*) FROM audit")[0][0] == audit_before  # never pruned
    assert web_old not in {serial for _, serial, *_ in authority.issued_svids(WEB)}
    # `ca status` still lists both identities, with their latest expiry
    assert [(sid, n) for sid, _, n, _ in authority.workloads()] == [(API, 1), (WEB, 2)]
    # a record just inside the retention stays until it is past it: web_recent
    # expired 1 h 1 min ago; a minute before its retention ends, it is still there
    clock.advance(SVID_RETENTION - timedelta(hours=1, minutes=2))
    assert authority.prune_svids() == 0
    clock.advance(timedelta(minutes=2))
    assert authority.prune_svids() == 1
    assert _serials(state) == {api_only, web_valid}


def test_a_backlog_goes_in_bounded_batches_oldest_first(
    authority: Authority, clock: Clock, state: Path
) -> None:
    old = []
    for _ in range(5):
        old.append(_issue(authority, WEB))
        clock.advance(timedelta(minutes=1))
    clock.advance(SVID_RETENTION + 2 * HOUR)
    newest = _issue(authority, WEB)
    assert [authority.prune_svids(limit=2) for _ in range(4)] == [2, 2, 1, 0]
    assert _serials(state) == {newest}
    assert old[0] not in _serials(state)


async def test_the_serving_authority_prunes_by_itself(
    state: Path, clock: Clock, tmp_path: Path
) -> None:
    from test_server_abuse import serving

    async with serving(state, clock) as plane:
        old = _issue(plane.authority, WEB)
        clock.advance(timedelta(minutes=1))
        kept = _issue(plane.authority, WEB)
        clock.advance(SVID_RETENTION + 2 * HOUR)
        with trio.fail_after(10):
            while old in _serials(state):  # noqa: ASYNC110 (a row in another process's database)
                await trio.sleep(0.05)
        assert _serials(state) >= {kept}
        lines = [e for e in plane.log if e["event"] == "svids_pruned"]
        assert lines and all(line["count"] >= 1 for line in lines)


def test_a_version_11_database_gets_the_indexes_pruning_uses(
    state: Path, clock: Clock, backend: str
) -> None:
    if backend != "sqlite":
        pytest.skip("the upgrade path is the same SQL on both; sqlite_master is SQLite's")
    conn = sqlite3.connect(state / DB_NAME)
    try:
        conn.execute("DROP INDEX svids_by_expiry")
        conn.execute("DROP INDEX svids_by_identity")
        conn.execute("UPDATE settings SET value = '11' WHERE name = 'schema_version'")
        conn.execute("PRAGMA user_version = 11")
        conn.commit()
    finally:
        conn.close()
    Authority.open(state, clock=clock).close()
    names = {str(row[0]) for row in query(state, "SELECT name FROM sqlite_master")}
    assert {"svids_by_expiry", "svids_by_identity"} <= names
    assert query(state, "PRAGMA user_version") == [(SCHEMA_VERSION,)]


def test_renewal_budgets_full_again_are_pruned_too(
    authority: Authority, clock: Clock, state: Path
) -> None:
    now = clock().timestamp()
    with authority.store.write() as conn:
        conn.execute(
            "INSERT INTO renewal_budgets (spiffe_id, tokens, at) VALUES (?, ?, ?), (?, ?, ?)",
            (str(WEB), 0.0, now, str(API), 0.0, now + 60),
        )
    clock.advance(authority.svid_ttl)  # WEB's bucket has refilled; API's not quite
    authority.prune_svids()
    assert query(state, "SELECT spiffe_id FROM renewal_budgets") == [(str(API),)]


def test_revoking_a_pruned_serial_says_why_it_is_not_found(
    authority: Authority, clock: Clock, state: Path
) -> None:
    old = _issue(authority, WEB)
    clock.advance(timedelta(minutes=1))
    _issue(authority, WEB)
    clock.advance(SVID_RETENTION + 2 * HOUR)
    assert authority.prune_svids() == 1
    with pytest.raises(PolicyError, match="needs no revoking"):
        authority.revoke_serial(old)


def test_revocations_of_serials_expired_long_ago_leave_the_feed(
    authority: Authority, clock: Clock, state: Path
) -> None:
    old = _issue(authority, WEB)
    authority.revoke_serial(old)
    clock.advance(timedelta(minutes=30))
    current = _issue(authority, WEB)  # expires half an hour after `old`
    authority.revoke_serial(current)
    assert authority.feed(WEB)["revoked_serials"] == sorted([old, current])
    # `old` expired 24 h ago less a minute: its revocation stays
    clock.advance(SVID_RETENTION + timedelta(minutes=29))
    authority.prune_svids()
    assert authority.feed(WEB)["revoked_serials"] == sorted([old, current])
    version = authority.versions()[1]
    clock.advance(timedelta(minutes=2))
    authority.prune_svids()
    # every peer refuses `old` for its expiry alone; `current`'s retention runs on
    assert authority.feed(WEB)["revoked_serials"] == [current]
    assert authority.versions()[1] == version + 1  # sidecars hear of the shorter list


def test_no_revocation_outlives_the_record_it_is_pruned_by(
    authority: Authority, clock: Clock, state: Path
) -> None:
    # A revocation is pruned by joining its SVID's record: were the record to go in
    # an earlier batch than the revocation, nothing would ever prune it, and it would
    # ride in every sidecar's feed for good.
    # API's one record, revoked, is its newest: kept, while its revocation goes.
    api_only = _issue(authority, API)
    authority.revoke_serial(api_only)
    clock.advance(timedelta(minutes=1))
    old = []
    for _ in range(4):
        old.append(_issue(authority, WEB))
        authority.revoke_serial(old[-1])
        clock.advance(timedelta(minutes=1))
    newest = _issue(authority, WEB)
    clock.advance(SVID_RETENTION + 2 * HOUR)
    for _ in range(6):  # 4 records and 5 revocations, one of each a batch at most
        authority.prune_svids(limit=1)
        orphans = query(
            state,
            "SELECT r.serial FROM revoked_serials r "
            "WHERE NOT EXISTS (SELECT 1 FROM svids s WHERE s.serial = r.serial)",
        )
        assert orphans == []
    assert _serials(state) == {api_only, newest}
    assert authority.feed(WEB)["revoked_serials"] == []


def _set_back_to_11(state: Path) -> None:
    """The database as schema 11 left it: no renewal budgets, no pruning indexes."""
    undo = (
        "DROP TABLE renewal_budgets",
        "DROP INDEX svids_by_expiry",
        "DROP INDEX svids_by_identity",
        "UPDATE settings SET value = '11' WHERE name = 'schema_version'",
    )
    database = backend.load(state)
    if database is not None:
        with psycopg.connect(database.url, password=database.password()) as pg:
            for statement in undo:
                pg.execute(statement)
        return
    conn = sqlite3.connect(state / DB_NAME)
    try:
        for statement in (*undo, "PRAGMA user_version = 11"):
            conn.execute(statement)
        conn.commit()
    finally:
        conn.close()


def test_a_version_11_database_opened_by_two_processes_at_once_migrates_once(
    state: Path, clock: Clock
) -> None:
    old = Authority.open(state, clock=clock)
    try:
        serial = _issue(old, WEB)
    finally:
        old.close()
    _set_back_to_11(state)
    opened: list[Authority] = []
    failed: list[BaseException] = []

    def open_one() -> None:
        try:
            opened.append(Authority.open(state, clock=clock))
        except BaseException as exc:  # reported below, in the test's thread
            failed.append(exc)

    workers = [threading.Thread(target=open_one) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=30)
    try:
        assert failed == [] and len(opened) == 2
        # both serve: each spends from the one budget the migration made, and prunes
        budget = TokenBucket(2, 3600.0)
        for authority in opened:
            leaf = authority.issue(WEB, generate_key().public_key(), ttl=HOUR).leaf
            with authority.store.write() as conn:
                authority._spend_renewal(conn, WEB, budget)
            assert leaf.serial_number
        assert opened[0].renewal_wait(WEB, budget) > 0
        assert opened[1].prune_svids() == 0
        assert serial in _serials(state)
    finally:
        for authority in opened:
            authority.close()
    assert query(state, "SELECT value FROM settings WHERE name = 'schema_version'") == [
        (str(SCHEMA_VERSION),)
    ]
