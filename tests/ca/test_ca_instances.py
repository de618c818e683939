"""Several authority instances, one trust domain in PostgreSQL: init, join, keys, status.

Each instance is a state directory of its own on one throwaway PostgreSQL
database (tests/ca/pg_cluster.py); they meet only through the database.
"""

from __future__ import annotations

import json
import stat
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest
from ca_helpers import TD, Clock, make_csr, query, run, serving_process, wait_event
from pg_cluster import PgCluster

from ca.authority import Authority
from ca.backend import DATABASE_FILE, Database
from ca.rootkeeper import RootKeeper
from ca.store import DB_NAME
from meshid.bundle import TrustBundle
from meshid.errors import PolicyError, StateError, TokenRejected
from meshid.spiffeid import SpiffeId, TrustDomain

WEB = SpiffeId(TD, "/web")


def two_instances(tmp_path: Path, url: str, clock: Clock) -> tuple[Authority, Authority]:
    """Instance `one` made by init, `two` joined with a zero propagation delay."""
    one = Authority.init(tmp_path / "one", TD, clock=clock, database=Database(url, "one"))
    two = Authority.join(
        tmp_path / "two",
        Database(url, "two"),
        audit_key=tmp_path / "one" / "audit.key",
        propagation=timedelta(0),
        clock=clock,
    )
    return one, two


def test_init_puts_the_trust_domain_in_the_database_and_the_instance_in_the_directory(
    tmp_path: Path, pg_url: str
) -> None:
    state = tmp_path / "one"
    result = run("ca", "init", "--state", str(state), "--trust-domain", TD.name,
                 "--database", pg_url, "--instance", "one")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "instance one" in result.output
    assert not (state / DB_NAME).exists()
    doc = json.loads((state / DATABASE_FILE).read_text())
    assert doc == {"engine": "postgresql", "url": pg_url, "instance": "one", "password_file": None}
    key = state / "keys" / "root-1.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    rows = query(state, "SELECT value FROM settings WHERE name = 'trust_domain'")
    assert rows == [(TD.name,)]
    # the key is in the directory only: no column of the database holds it
    key_pem = key.read_text()
    assert not [r for r in query(state, "SELECT cert_pem, key_file FROM roots") if key_pem in r]
    # every other command works unchanged on the instance's directory
    assert run("ca", "token", "web", "--state", str(state)).exit_code == 0
    again = run("ca", "init", "--state", str(tmp_path / "other"), "--trust-domain", TD.name,
                "--database", pg_url)  # fmt: skip
    assert again.exit_code == 1
    assert "already holds trust domain example.org" in again.output
    assert not (tmp_path / "other" / DATABASE_FILE).exists()


@pytest.mark.parametrize(
    "url",
    [
        "host=/tmp dbname=x password=hunter2secret",
        "postgresql://meshid:hunter2secret@db.internal/meshid",
        "postgresql://db.internal/meshid?password=hunter2secret",
        "host=db.internal dbname=meshid sslpassword=hunter2secret",
    ],
)
def test_a_url_carrying_a_password_is_refused_without_echoing_it(tmp_path: Path, url: str) -> None:
    result = run("ca", "init", "--state", str(tmp_path / "s"), "--trust-domain", TD.name,
                 "--database", url)  # fmt: skip
    assert result.exit_code == 1
    assert "carries a password" in result.output
    assert "hunter2secret" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists()


def test_an_unparsable_url_is_refused_without_quoting_it(tmp_path: Path) -> None:
    result = run("ca", "init", "--state", str(tmp_path / "s"), "--trust-domain", TD.name,
                 "--database", "host=x hunter2secret")  # fmt: skip
    assert result.exit_code == 1
    assert "not a libpq connection string" in result.output
    assert "hunter2secret" not in result.output


def test_join_publishes_the_new_root_before_it_signs(
    tmp_path: Path, pg_url: str, clock: Clock
) -> None:
    one = Authority.init(tmp_path / "one", TD, clock=clock, database=Database(pg_url, "one"))
    two = Authority.join(
        tmp_path / "two",
        Database(pg_url, "two"),
        audit_key=tmp_path / "one" / "audit.key",
        propagation=timedelta(minutes=5),
        clock=clock,
    )
    try:
        # both instances publish both roots at once, before the new one signs anything
        assert len(one.bundle().roots) == len(two.bundle().roots) == 2
        assert (tmp_path / "two" / "keys" / "root-2.key").is_file()
        assert not (tmp_path / "one" / "keys" / "root-2.key").exists()
        with pytest.raises(StateError, match="not in every sidecar's bundle yet"):
            two.issue(WEB, make_csr()[0].public_key())
        waiting = run("ca", "status", "--state", str(tmp_path / "two"))
        assert waiting.exit_code == 0, waiting.output
        assert "this instance signs nothing yet: its root 2 activates in " in waiting.output
        doc = json.loads(run("ca", "status", "--json", "--state", str(tmp_path / "two")).output)
        assert doc["active_root"] is None
        first = one.issue(WEB, make_csr()[0].public_key())  # the first instance carries on
        clock.advance(timedelta(minutes=5, seconds=1))
        second = two.issue(WEB, make_csr()[0].public_key())
        assert first.leaf.issuer != second.leaf.issuer  # each signs with its own root
        assert two.pending_root() is None
        instances = {i.name: i for i in one.instances()}
        assert instances["one"].generation == 1 and instances["two"].generation == 2
        assert one.store.verify_audit() == two.store.verify_audit()
        assert two.store.verify_audit()[1] is None
    finally:
        one.close()
        two.close()


def test_join_refuses_a_name_taken_and_a_database_without_a_trust_domain(
    tmp_path: Path, pg_url: str, pg_cluster: PgCluster, clock: Clock
) -> None:
    Authority.init(tmp_path / "one", TD, clock=clock, database=Database(pg_url, "one")).close()
    with pytest.raises(StateError, match="already in this trust domain"):
        Authority.join(
            tmp_path / "two",
            Database(pg_url, "one"),
            audit_key=tmp_path / "one" / "audit.key",
            clock=clock,
        )
    assert not (tmp_path / "two" / DATABASE_FILE).exists()
    empty = pg_cluster.url(pg_cluster.create_database())
    with pytest.raises(StateError, match="holds no meshid trust domain"):
        Authority.join(
            tmp_path / "three",
            Database(empty, "three"),
            audit_key=tmp_path / "one" / "audit.key",
            clock=clock,
        )


def test_a_token_made_on_one_instance_enrolls_through_the_other_once(
    tmp_path: Path, pg_url: str, clock: Clock
) -> None:
    one, two = two_instances(tmp_path, pg_url, clock)
    try:
        token = one.create_token(WEB)
        _key, csr = make_csr()
        assert two.enroll(token, csr).spiffe_id == WEB
        for instance in (one, two):
            with pytest.raises(TokenRejected) as info:
                instance.enroll(token, make_csr()[1])
            assert info.value.reason == "token_used"
    finally:
        one.close()
        two.close()


def test_status_lists_the_instances_their_roots_and_when_each_was_heard(
    tmp_path: Path, pg_url: str, clock: Clock
) -> None:
    one, two = two_instances(tmp_path, pg_url, clock)
    two.issue(WEB, make_csr()[0].public_key())  # activates its root
    one.heard()
    one.close()
    two.close()
    text = run("ca", "status", "--state", str(tmp_path / "two"))
    assert text.exit_code == 0, text.output
    assert "instance one: signs with root 1, last heard" in text.output
    assert "instance two: signs with root 2, never heard from" in text.output
    doc = json.loads(run("ca", "status", "--json", "--state", str(tmp_path / "one")).output)
    by_name = {i["name"]: i for i in doc["instances"]}
    assert by_name["one"]["root_generation"] == 1 and by_name["one"]["last_heard"] is not None
    assert by_name["two"]["root_generation"] == 2 and by_name["two"]["last_heard"] is None


def test_join_through_the_cli(tmp_path: Path, pg_url: str) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    made = run("ca", "init", "--state", str(one), "--trust-domain", TD.name,
               "--database", pg_url, "--instance", "one")  # fmt: skip
    assert made.exit_code == 0, made.output
    joined = run("ca", "join", "--state", str(two), "--database", pg_url, "--instance", "two",
                 "--audit-key", str(one / "audit.key"), "--propagation", "10s")  # fmt: skip
    assert joined.exit_code == 0, joined.output
    assert f"instance two joined {TD.id}: its root 2 is in the bundle" in joined.output
    assert stat.S_IMODE((two / "keys" / "root-2.key").stat().st_mode) == 0o600
    assert (two / "bundle.pem").read_bytes().count(b"BEGIN CERTIFICATE") == 2
    again = run("ca", "join", "--state", str(two), "--database", pg_url, "--instance", "three",
                "--audit-key", str(one / "audit.key"))  # fmt: skip
    assert again.exit_code == 1 and "already holds an authority" in again.output
    missing = run("ca", "join", "--state", str(tmp_path / "x"), "--audit-key", "k")
    assert missing.exit_code == 1 and "--database is required" in missing.output
    assert run("ca", "audit", "verify", "--state", str(two)).exit_code == 0


def test_a_rotation_on_one_instance_leaves_the_other_signing_with_its_own_root(
    tmp_path: Path, pg_url: str, clock: Clock
) -> None:
    one, two = two_instances(tmp_path, pg_url, clock)
    try:
        assert two.signer()[0] == 2
        one.issue(WEB, make_csr()[0].public_key())  # keeps root 1 retiring, not retired
        generation, _at = one.rotate(timedelta(0))
        assert generation == 3
        one.advance_roots()
        two.advance_roots()  # sees one's new root; activates nothing of its own
        assert one.signer()[0] == 3 and two.signer()[0] == 2
        states = dict(query(tmp_path / "one", "SELECT generation, state FROM roots"))
        assert states == {1: "retiring", 2: "active", 3: "active"}
        assert len(two.bundle().roots) == 3  # the retiring root stays until its SVIDs expire
    finally:
        one.close()
        two.close()


def test_a_database_from_a_newer_version_is_refused(
    tmp_path: Path, pg_url: str, clock: Clock
) -> None:
    Authority.init(tmp_path / "one", TD, clock=clock, database=Database(pg_url, "one")).close()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("UPDATE settings SET value = '999' WHERE name = 'schema_version'")
    result = run("ca", "status", "--state", str(tmp_path / "one"))
    assert result.exit_code == 1 and "made by a newer meshid" in result.output


def test_the_audit_chain_written_by_two_instances_verifies_on_each_and_catches_an_edit(
    tmp_path: Path, pg_url: str, clock: Clock
) -> None:
    one, two = two_instances(tmp_path, pg_url, clock)
    try:
        for n in range(3):  # interleaved writers, one chain
            one.create_token(SpiffeId(TD, f"/a{n}"))
            two.create_token(SpiffeId(TD, f"/b{n}"))
    finally:
        one.close()
        two.close()
    for name in ("one", "two"):
        verified = run("ca", "audit", "verify", "--state", str(tmp_path / name))
        assert verified.exit_code == 0, verified.output
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("UPDATE audit SET details = '{}' WHERE seq = 3")
    for name in ("one", "two"):
        broken = run("ca", "audit", "verify", "--state", str(tmp_path / name))
        assert broken.exit_code == 1 and "entry 3 was modified" in broken.output, broken.output


def test_removing_a_lost_instance_retires_its_root_after_its_svids_or_at_once(
    tmp_path: Path, pg_url: str, clock: Clock
) -> None:
    one, two = two_instances(tmp_path, pg_url, clock)
    try:
        issued = two.issue(WEB, make_csr()[0].public_key())  # activates root 2
        with pytest.raises(PolicyError, match="cannot remove itself"):
            one.remove_instance("one")
        with pytest.raises(PolicyError, match="no instance 'three'"):
            one.remove_instance("three")
        before = one.bundle().sequence
        one.remove_instance("two")
        assert [i.name for i in one.instances()] == ["one"]
        # root 2 stays in the bundle while an SVID it signed is valid, then goes
        assert len(one.bundle().roots) == 2 and one.bundle().sequence > before
        clock.advance(issued.leaf.not_valid_after_utc - clock() + timedelta(seconds=1))
        one.advance_roots()
        assert len(one.bundle().roots) == 1
    finally:
        one.close()
        two.close()
    three = Authority.join(
        tmp_path / "three",
        Database(pg_url, "three"),
        audit_key=tmp_path / "one" / "audit.key",
        propagation=timedelta(0),
        clock=clock,
    )
    three.issue(WEB, make_csr()[0].public_key())
    three.close()
    result = run("ca", "instance", "remove", "three", "--now", "--state", str(tmp_path / "one"))
    assert result.exit_code == 0, result.output
    assert "root 3 left the bundle" in result.output
    rows = query(tmp_path / "one", "SELECT state FROM roots WHERE instance = 'three'")
    assert rows == [("retired",)]
    audit = query(tmp_path / "one", "SELECT action FROM audit WHERE action = 'instance_removed'")
    assert len(audit) == 2


def test_an_instance_is_removed_through_the_control_plane(tmp_path: Path, pg_url: str) -> None:
    """`ca instance remove` changes only the database: an operator may run it with --server."""
    one, two = tmp_path / "one", tmp_path / "two"
    assert run("ca", "init", "--state", str(one), "--trust-domain", TD.name,
               "--database", pg_url, "--instance", "one").exit_code == 0  # fmt: skip
    assert run("ca", "join", "--state", str(two), "--database", pg_url, "--instance", "two",
               "--audit-key", str(one / "audit.key")).exit_code == 0  # fmt: skip
    alice = f"spiffe://{TD.name}/meshid/operator/alice"
    issued = run("ca", "issue", alice, "--out", str(tmp_path / "alice"), "--state", str(one))
    assert issued.exit_code == 0, issued.output
    assert run("ca", "operator", "add", alice, "--state", str(one)).exit_code == 0
    log = tmp_path / "serve.log"
    with serving_process(one, log) as proc:
        remote = ("--server", str(wait_event(log, "serving", proc, 30)["listen"]),
                  "--svid", str(tmp_path / "alice"))  # fmt: skip
        removed = run("ca", "instance", "remove", "two", *remote)
        assert removed.exit_code == 0, removed.output
        assert removed.output.startswith("instance two removed: root 2 ")
        unknown = run("ca", "instance", "remove", "two", *remote)
        assert unknown.exit_code == 1 and "no instance 'two'" in unknown.output
    assert query(one, "SELECT name FROM instances") == [("one",)]


def test_two_instances_keepers_rotating_at_once_each_publish_one_root(
    tmp_path: Path, pg_url: str, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both roots reach half-life together; the keepers race for the next generation
    number. The database refuses the second insert of one number; the loser logs,
    drops its unused key and publishes the next number on its retry."""
    one, two = two_instances(tmp_path, pg_url, clock)
    logged: dict[str, list[dict[str, object]]] = {"one": [], "two": []}

    def keeper(authority: Authority, name: str) -> RootKeeper:
        record = logged[name].append
        return RootKeeper(authority, lambda event, **f: record({"event": event, **f}),
                          timedelta(seconds=30))  # fmt: skip

    try:
        two.issue(WEB, make_csr()[0].public_key())  # activates root 2
        keepers = {"one": keeper(one, "one"), "two": keeper(two, "two")}
        clock.advance(timedelta(days=366) / 2 + timedelta(days=1))
        publish = two._publish_root

        def one_first(*args: object, **kwargs: object) -> None:
            """Two has picked its number; one publishes the same number first."""
            keepers["one"].tick()
            publish(*args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(two, "_publish_root", one_first)
        keepers["two"].tick()
        monkeypatch.undo()
        [failed] = [e for e in logged["two"] if e["event"] == "root_rotation_failed"]
        assert "at the same moment" in str(failed["detail"])
        assert not (tmp_path / "two" / "keys" / "root-3.key").exists()  # its key, dropped
        clock.advance(timedelta(seconds=failed["retry_in"]) + timedelta(seconds=1))  # type: ignore[arg-type]
        keepers["two"].tick()
        keepers["one"].tick()  # one's root is pending: nothing more to do
        rows = query(tmp_path / "one", "SELECT generation, instance, state FROM roots ORDER BY 1")
        assert rows == [(1, "one", "active"), (2, "two", "active"), (3, "one", "next"),
                        (4, "two", "next")]  # fmt: skip
        assert [e["generation"] for e in logged["one"] if e["event"] == "root_prepared"] == [3]
        assert [e["generation"] for e in logged["two"] if e["event"] == "root_prepared"] == [4]
        assert sorted(p.name for p in (tmp_path / "two" / "keys").iterdir()) == [
            "root-2.key",
            "root-4.key",
        ]
        assert len(one.bundle().roots) == 4
    finally:
        one.close()
        two.close()
    assert run("ca", "audit", "verify", "--state", str(tmp_path / "two")).exit_code == 0


def test_two_instances_refreshing_one_federated_bundle_at_once(
    tmp_path: Path, pg_url: str, clock: Clock
) -> None:
    """Both instances fetch the same foreign bundle; the foreign side moves on between
    their fetches and the older fetch is recorded last: it is merely late, not a
    failure, and the newer bundle stays."""
    one, two = two_instances(tmp_path, pg_url, clock)
    other = Authority.init(tmp_path / "other", TrustDomain("other.org"), clock=clock)
    try:
        roots = other.bundle().roots
        at = {n: TrustBundle(other.trust_domain, roots, sequence=n) for n in (1, 5, 6)}
        endpoint = SpiffeId(other.trust_domain, "/meshid/bundle-endpoint")
        one.add_federation("https://other.org:8443", endpoint, at[1], at[1])
        seen_by_one = one.federation(other.trust_domain).bundle  # before each fetched
        seen_by_two = two.federation(other.trust_domain).bundle
        two.record_fetch(other.trust_domain, at[6], seen=seen_by_two)
        late = one.record_fetch(other.trust_domain, at[5], seen=seen_by_one)
        assert (late.bundle.sequence, late.failures, late.last_error) == (6, 0, None)
        # a replayed older bundle, fetched after the newer one was held, is still refused
        replayed = one.record_fetch(other.trust_domain, at[5], seen=late.bundle)
        assert (replayed.bundle.sequence, replayed.failures) == (6, 1)
        assert replayed.last_error == "bundle_sequence_backwards"
    finally:
        other.close()
        one.close()
        two.close()
