"""One audit chain written by two instances on PostgreSQL: it verifies on both, and an
attacker who can write the database alone cannot edit it or cut it short unnoticed."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest
from ca_helpers import TD, Clock, run

from ca.authority import Authority
from ca.backend import Database
from meshid.spiffeid import SpiffeId

WEB = SpiffeId(TD, "/web")
API = SpiffeId(TD, "/api")


@pytest.fixture
def pair(tmp_path: Path, pg_url: str, clock: Clock) -> Iterator[tuple[Authority, Authority]]:
    """Instances one and two, each having written rows of the chain: one's, then two's."""
    Authority.init(tmp_path / "one", TD, clock=clock, database=Database(pg_url, "one")).close()
    Authority.join(
        tmp_path / "two",
        Database(pg_url, "two"),
        audit_key=tmp_path / "one" / "audit.key",
        propagation=timedelta(0),
        clock=clock,
    ).close()
    one = Authority.open(tmp_path / "one", clock=clock)
    two = Authority.open(tmp_path / "two", clock=clock)
    one.allow(WEB, API)  # 3
    two.deny(WEB, API)  # 4
    two.revoke(API)  # 5
    try:
        yield one, two
    finally:
        one.close()
        two.close()


def sql(pg_url: str, statement: str) -> None:
    """The attacker: writes to the database, knows neither key nor state directory."""
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(statement)


def cli_verify(authority: Authority) -> tuple[int, str]:
    result = run("ca", "audit", "verify", "--state", str(authority.state_dir))
    return result.exit_code, result.output


def test_two_instances_write_one_chain_that_verifies_on_both(
    pair: tuple[Authority, Authority],
) -> None:
    one, two = pair
    actions = [e.action for e in one.store.audit_entries()]
    assert actions == ["init", "instance_joined", "policy_allow", "policy_deny", "revoke"]
    assert one.store.verify_audit() == (5, None)
    assert two.store.verify_audit() == (5, None)
    for authority in pair:
        assert cli_verify(authority) == (0, "audit log intact: 5 entries\n")


def test_the_newest_rows_deleted_fail_on_both(
    pair: tuple[Authority, Authority], pg_url: str
) -> None:
    """Instance one never saw rows 4 and 5: two's checkpoint names them."""
    one, two = pair
    sql(pg_url, "DELETE FROM audit WHERE seq >= 4")
    assert one.store.verify_audit() == (
        4,
        "entries 4 to 5 are missing: the log was cut short (instance two wrote entry 5)",
    )
    assert two.store.verify_audit() == (4, "entries 4 to 5 are missing: the log was cut short")
    for authority in pair:
        code, out = cli_verify(authority)
        assert code == 1 and out.startswith("Error: audit log tampered: entries 4 to 5 are")
        assert out.count("\n") == 1


def test_an_edited_row_fails_on_both(pair: tuple[Authority, Authority], pg_url: str) -> None:
    sql(pg_url, 'UPDATE audit SET details = \'{"spiffe_id":"spiffe://x/y"}\' WHERE seq = 4')
    for authority in pair:
        assert authority.store.verify_audit() == (4, "entry 4 was modified")
        code, out = cli_verify(authority)
        assert (code, out) == (1, "Error: audit log tampered: entry 4 was modified\n")


def test_cutting_rows_and_deleting_their_checkpoint_fails_on_both(
    pair: tuple[Authority, Authority], pg_url: str
) -> None:
    one, two = pair
    sql(pg_url, "DELETE FROM audit WHERE seq >= 4")
    sql(pg_url, "DELETE FROM audit_checkpoints WHERE instance = 'two'")
    assert one.store.verify_audit() == (3, "the checkpoint of instance two is missing")
    assert two.store.verify_audit()[1] == "entries 4 to 5 are missing: the log was cut short"


def test_a_forged_checkpoint_fails(pair: tuple[Authority, Authority], pg_url: str) -> None:
    one, _two = pair
    sql(pg_url, "UPDATE audit_checkpoints SET seq = 3 WHERE instance = 'two'")
    assert one.store.verify_audit() == (3, "the checkpoint of instance two was forged or modified")


def test_a_replayed_checkpoint_is_caught_by_the_writer_and_by_a_witness(
    pair: tuple[Authority, Authority], pg_url: str
) -> None:
    """The case one instance alone cannot see (ca.audit): newest rows cut together with
    their writer's checkpoint set back to a genuine older copy. The writer sees it; so does
    every instance that witnessed the newer rows first, as `ca serve` does every few seconds."""
    one, two = pair
    with psycopg.connect(pg_url, autocommit=True) as conn:
        copy = conn.execute("SELECT seq, mac, tag FROM audit_checkpoints WHERE instance = 'two'")
        old_seq, old_mac, old_tag = copy.fetchone() or (0, "", "")
    assert old_seq == 5
    two.allow(API, WEB)  # 6
    assert one.store.witness_audit() == 6
    sql(pg_url, "DELETE FROM audit WHERE seq = 6")
    sql(
        pg_url,
        f"UPDATE audit_checkpoints SET seq = {old_seq}, mac = '{old_mac}', tag = '{old_tag}' "
        "WHERE instance = 'two'",
    )
    for authority in pair:
        assert authority.store.verify_audit() == (
            6,
            "entries 6 to 6 are missing: the log was cut short",
        )


def test_a_forged_newest_row_is_not_witnessed(
    pair: tuple[Authority, Authority], pg_url: str
) -> None:
    one, _two = pair
    sql(
        pg_url,
        "INSERT INTO audit (seq, at, action, details, prev_hash, hash) "
        "SELECT 6, at, 'revoke', details, hash, repeat('0', 64) FROM audit WHERE seq = 5",
    )
    assert one.store.witness_audit() is None
    assert one.store.verify_audit() == (6, "entry 6 was modified")
