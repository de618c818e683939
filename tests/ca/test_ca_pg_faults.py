"""PostgreSQL going away, and the database password: one-line errors, nothing half-written,
the password never in any output."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
from ca_helpers import TD, Clock, make_csr, query, run, serving_process, wait_lines
from pg_cluster import PASSWORD_ROLE, PgCluster

from ca.api import ControlApi, Request
from ca.authority import Authority
from ca.backend import DATABASE_FILE, Database
from meshid.errors import StorageUnavailable
from meshid.ratelimit import FailureLimiter
from meshid.spiffeid import SpiffeId

WEB = SpiffeId(TD, "/web")
PASSWORD = "pw-7Ghq2-never-shown"


def dbname(url: str) -> str:
    return dict(p.split("=", 1) for p in url.split())["dbname"]


def cut_off(cluster: PgCluster, name: str) -> None:
    """End every connection to database `name` (as a server restart or failover would)."""
    with psycopg.connect(cluster.admin_url(), autocommit=True) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        )


@contextmanager
def unreachable(cluster: PgCluster, name: str) -> Iterator[None]:
    """Database `name` refuses every connection until the block ends."""
    with psycopg.connect(cluster.admin_url(), autocommit=True) as admin:
        admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS false")
    cut_off(cluster, name)
    try:
        yield
    finally:
        with psycopg.connect(cluster.admin_url(), autocommit=True) as admin:
            admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")


def test_init_on_an_unreachable_database_is_one_line_and_leaves_nothing(
    tmp_path: Path, pg_cluster: PgCluster
) -> None:
    url = f"host={pg_cluster.root}/nowhere dbname=x user=postgres"
    state = tmp_path / "s"
    result = run("ca", "init", "--state", str(state), "--trust-domain", TD.name, "--database", url)
    assert result.exit_code == 1
    assert result.output.startswith("Error: cannot reach the authority database")
    assert len(result.output.strip().splitlines()) == 1
    assert not state.exists() or list(state.iterdir()) == [state / ".lock"]


def test_a_connection_lost_while_idle_is_replaced_without_an_error(
    tmp_path: Path, pg_url: str, pg_cluster: PgCluster, clock: Clock
) -> None:
    authority = Authority.init(tmp_path / "s", TD, clock=clock, database=Database(pg_url, "one"))
    try:
        cut_off(pg_cluster, dbname(pg_url))
        authority.create_token(WEB)  # a new connection, and the write lands
        assert query(tmp_path / "s", "SELECT COUNT(*) FROM tokens") == [(1,)]
    finally:
        authority.close()


def test_a_connection_lost_inside_a_transaction_changes_nothing(
    tmp_path: Path, pg_url: str, pg_cluster: PgCluster, clock: Clock
) -> None:
    authority = Authority.init(tmp_path / "s", TD, clock=clock, database=Database(pg_url, "one"))
    try:
        with pytest.raises(StorageUnavailable) as info, authority.store.write() as conn:
            conn.execute("INSERT INTO revocations VALUES (?, ?)", (str(WEB), 1.0))
            cut_off(pg_cluster, dbname(pg_url))
            conn.execute("UPDATE counters SET value = 99 WHERE name = 'revocation_version'")
        assert info.value.reason == "storage_unavailable"
        assert "nothing was changed" in info.value.message
        assert query(tmp_path / "s", "SELECT COUNT(*) FROM revocations") == [(0,)]
        assert authority.versions()[1] == 0  # and the next call works on a new connection
    finally:
        authority.close()


def test_a_write_that_waited_out_the_lock_leaves_the_connection_usable(
    tmp_path: Path, pg_url: str, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another instance holds the write lock past the wait: this write fails with
    storage_unavailable, and the next one, the lock free, lands on the same connection."""
    from ca import pgengine

    monkeypatch.setattr(pgengine, "LOCK_TIMEOUT", "200ms")
    authority = Authority.init(tmp_path / "s", TD, clock=clock, database=Database(pg_url, "one"))
    try:
        with psycopg.connect(pg_url) as holder:
            holder.execute("SELECT pg_advisory_xact_lock(%s)", (pgengine.WRITE_LOCK_KEY,))
            with pytest.raises(StorageUnavailable) as info:
                authority.create_token(WEB)
            assert info.value.reason == "storage_unavailable"
            holder.rollback()
        authority.create_token(WEB)
        assert query(tmp_path / "s", "SELECT COUNT(*) FROM tokens") == [(1,)]
    finally:
        authority.close()


def test_the_api_answers_503_while_the_database_is_unreachable_and_recovers(
    tmp_path: Path, pg_url: str, pg_cluster: PgCluster, clock: Clock
) -> None:
    state = tmp_path / "s"
    Authority.init(state, TD, clock=clock, database=Database(pg_url, "one")).close()
    authority = Authority.open(state, clock=clock)
    try:
        cert = authority.issue(WEB, make_csr()[0].public_key()).leaf
        api = ControlApi(authority, clock, time.monotonic, FailureLimiter())
        body = json.dumps({"instance": "i", "bundle_sequence": 1}).encode()
        request = Request("POST", "/v1/report", {}, body, "x", cert)
        with unreachable(pg_cluster, dbname(pg_url)):
            (reply,) = api.handle_batch([request])
            assert reply.status == 503, reply.body
            assert reply.body["error"] == "storage_unavailable"
            assert ("retry-after", "5") in reply.headers
        (reply,) = api.handle_batch([request])
        assert reply.status != 503
    finally:
        authority.close()


def test_commands_on_an_unreachable_database_print_one_line(
    tmp_path: Path, pg_url: str, pg_cluster: PgCluster, clock: Clock
) -> None:
    state = tmp_path / "s"
    Authority.init(state, TD, clock=clock, database=Database(pg_url, "one")).close()
    with unreachable(pg_cluster, dbname(pg_url)):
        commands = (
            ["ca", "status"],
            ["ca", "token", "web"],
            ["policy", "list"],
            ["ca", "serve", "--listen", "127.0.0.1:0"],
        )
        for argv in commands:
            result = run(*argv, "--state", str(state))
            assert result.exit_code == 1, (argv, result.output)
            assert result.output.startswith("Error: cannot reach the authority database"), argv
            assert len(result.output.strip().splitlines()) == 1


def test_the_password_comes_from_its_file_and_never_shows(
    tmp_path: Path, pg_cluster: PgCluster
) -> None:
    pg_cluster.set_password(PASSWORD)
    url = pg_cluster.url(pg_cluster.create_database(), user=PASSWORD_ROLE)
    secret = tmp_path / "db.password"
    secret.write_text(PASSWORD + "\n")
    one = tmp_path / "one"
    outputs = []
    made = run("ca", "init", "--state", str(one), "--trust-domain", TD.name, "--database", url,
               "--database-password-file", str(secret), "--instance", "one")  # fmt: skip
    outputs.append(made.output)
    assert made.exit_code == 0, made.output
    assert json.loads((one / DATABASE_FILE).read_text())["password_file"] == str(secret)
    status = run("ca", "status", "--state", str(one))  # the file is read again, by path
    outputs.append(status.output)
    assert status.exit_code == 0, status.output
    # without it, libpq has no password: a one-line error
    nopass = run("ca", "init", "--state", str(tmp_path / "x"), "--trust-domain", TD.name,
                 "--database", url)  # fmt: skip
    outputs.append(nopass.output)
    assert nopass.exit_code == 1 and len(nopass.output.strip().splitlines()) == 1
    # a rotated password: the old one in the file is refused, in words without it
    pg_cluster.set_password(PASSWORD + "-new")
    stale = run("ca", "status", "--state", str(one))
    outputs.append(stale.output)
    assert stale.exit_code == 1
    assert "password authentication failed" in stale.output
    secret.write_text(PASSWORD + "-new\n")
    assert run("ca", "status", "--state", str(one)).exit_code == 0
    for text in outputs:
        assert PASSWORD not in text
    for path in one.rglob("*"):
        if path.is_file():
            assert PASSWORD.encode() not in path.read_bytes(), path


@pytest.mark.slow  # a real server process through an outage
def test_serve_logs_the_outage_with_a_reason_recovers_and_never_logs_the_password(
    tmp_path: Path, pg_cluster: PgCluster
) -> None:
    pg_cluster.set_password(PASSWORD)
    name = pg_cluster.create_database()
    secret = tmp_path / "db.password"
    secret.write_text(PASSWORD + "\n")
    state = tmp_path / "one"
    made = run("ca", "init", "--state", str(state), "--trust-domain", TD.name,
               "--database", pg_cluster.url(name, user=PASSWORD_ROLE),
               "--database-password-file", str(secret), "--instance", "one")  # fmt: skip
    assert made.exit_code == 0, made.output
    log = tmp_path / "serve.log"
    with serving_process(state, log) as proc:
        wait_lines(log, '"serving"', 1, proc)
        with unreachable(pg_cluster, name):
            (failed,) = wait_lines(log, '"poll_failed"', 1, proc)
            assert json.loads(failed)["reason"] == "storage_unavailable"
        wait_lines(log, '"poll_recovered"', 1, proc)
        assert proc.poll() is None  # it kept running through the outage
    assert PASSWORD not in log.read_text()


def test_a_rotated_password_takes_effect_on_the_next_connection_without_a_restart(
    tmp_path: Path, pg_cluster: PgCluster, clock: Clock
) -> None:
    pg_cluster.set_password(PASSWORD)
    name = pg_cluster.create_database()
    secret = tmp_path / "db.password"
    secret.write_text(PASSWORD + "\n")
    database = Database(pg_cluster.url(name, user=PASSWORD_ROLE), "one", password_file=secret)
    authority = Authority.init(tmp_path / "s", TD, clock=clock, database=database)
    try:
        pg_cluster.set_password(PASSWORD + "-2")
        secret.write_text(PASSWORD + "-2\n")
        authority.create_token(WEB)  # the open connection carries on
        cut_off(pg_cluster, name)
        authority.create_token(WEB)  # a new connection, with the file's new password
        assert query(tmp_path / "s", "SELECT COUNT(*) FROM tokens") == [(2,)]
    finally:
        authority.close()
