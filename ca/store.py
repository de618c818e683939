"""The authority's database: one SQLite file in the state directory.

Every change runs in one `BEGIN IMMEDIATE` transaction, so concurrent CLI
invocations and the control-plane server serialise on SQLite's write lock
instead of racing: a join token is consumed by exactly one caller, a version
number is raised exactly once per change, and an audit row lands in the same
transaction as the change it records.

The audit log is hash-chained: each row's hash covers the previous row's hash
and the row's own content, so editing, deleting or reordering a row breaks
the chain from that row on.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshid.errors import StateError, StorageUnavailable

DB_NAME = "authority.db"
SCHEMA_VERSION = 2  # kept in PRAGMA user_version; 0 there is a version-1 database
GENESIS_HASH = "0" * 64

_SCHEMA = """
CREATE TABLE settings (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE roots (
    generation INTEGER PRIMARY KEY,
    cert_pem TEXT NOT NULL,
    key_file TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('next', 'active', 'retiring', 'retired')),
    not_after REAL NOT NULL,
    created_at REAL NOT NULL,
    activate_at REAL,
    published_sequence INTEGER,                -- the bundle sequence that first held it
    wait_for_acks INTEGER NOT NULL DEFAULT 1   -- activate only once live sidecars hold it
);
CREATE TABLE tokens (
    hash TEXT PRIMARY KEY,
    spiffe_id TEXT NOT NULL,
    dns TEXT NOT NULL,
    ips TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    used_at REAL
);
CREATE TABLE policy (
    source TEXT NOT NULL,
    target TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (source, target)
);
CREATE TABLE revocations (spiffe_id TEXT PRIMARY KEY, revoked_at REAL NOT NULL);
CREATE TABLE svids (
    serial TEXT PRIMARY KEY,
    spiffe_id TEXT NOT NULL,
    generation INTEGER NOT NULL,
    not_after REAL NOT NULL,
    issued_at REAL NOT NULL,
    how TEXT NOT NULL
);
CREATE INDEX svids_by_generation ON svids (generation, not_after);
CREATE TABLE reports (
    spiffe_id TEXT NOT NULL,                   -- from the client certificate, never the body
    instance TEXT NOT NULL,                    -- one running sidecar of that identity
    seen_at REAL NOT NULL,
    report TEXT NOT NULL,
    PRIMARY KEY (spiffe_id, instance)
);
CREATE INDEX reports_by_seen ON reports (seen_at);
CREATE TABLE audit (
    seq INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    action TEXT NOT NULL,
    details TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
"""

# Each step takes a database from the version before it to its own version, in
# the same transaction that records the new version.
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    2: (  # reports keyed by (identity, instance): one identity cannot replace another's
        """CREATE TABLE reports_v2 (
            spiffe_id TEXT NOT NULL,
            instance TEXT NOT NULL,
            seen_at REAL NOT NULL,
            report TEXT NOT NULL,
            PRIMARY KEY (spiffe_id, instance)
        )""",
        "INSERT INTO reports_v2 (spiffe_id, instance, seen_at, report) "
        "SELECT spiffe_id, instance, seen_at, report FROM reports",
        "DROP TABLE reports",
        "ALTER TABLE reports_v2 RENAME TO reports",
        "CREATE INDEX reports_by_seen ON reports (seen_at)",
        "UPDATE settings SET value = '2' WHERE name = 'schema_version'",
    ),
}

COUNTERS = ("policy_version", "revocation_version", "bundle_sequence")


# SQLite's primary result codes for faults of the host rather than of the request
_HOST_FAILURES = {
    sqlite3.SQLITE_FULL: "the disk is full",
    sqlite3.SQLITE_READONLY: "the database is read-only",
    sqlite3.SQLITE_IOERR: "an I/O error",
    sqlite3.SQLITE_CANTOPEN: "a journal file cannot be opened",
    sqlite3.SQLITE_PERM: "permission denied",
}


_UNAVAILABLE = "cannot write the authority database; nothing was changed"


def _host_failure(exc: BaseException) -> str | None:
    """What went wrong, when `exc` is a sqlite3 error that the host caused."""
    if not isinstance(exc, sqlite3.Error):
        return None
    code = getattr(exc, "sqlite_errorcode", None)
    return _HOST_FAILURES.get(code & 0xFF) if isinstance(code, int) else None


def _raise_host_failure(exc: BaseException) -> None:
    """Raise StorageUnavailable in place of a sqlite3 error that the host caused."""
    what = _host_failure(exc)
    if what is not None:
        raise StorageUnavailable(
            f"cannot write the authority database: {what}; nothing was changed"
        ) from None


def _row_hash(prev_hash: str, seq: int, at: float, action: str, details: str) -> str:
    body = json.dumps([prev_hash, seq, repr(at), action, details], separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class AuditEntry:
    seq: int
    at: float
    action: str
    details: dict[str, Any]
    prev_hash: str
    hash: str


class Store:
    """A connection to the authority database, used by one thread at a time."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self._writing = False  # inside write(): a nested write() is a savepoint
        self._broken = False  # the open transaction was lost to a host failure

    @classmethod
    def open(cls, path: Path, *, create: bool = False) -> Store:
        if not create and not path.is_file():
            raise StateError(f"{path.parent}: no authority here (run 'meshid ca init')")
        try:
            conn = sqlite3.connect(
                path, isolation_level=None, timeout=30.0, check_same_thread=False
            )
            conn.execute("PRAGMA busy_timeout = 30000")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
        except sqlite3.Error as exc:
            conn_error = f"{path}: cannot open the authority database: {exc}"
            if _host_failure(exc) is not None:
                raise StorageUnavailable(conn_error) from None
            raise StateError(conn_error) from None
        store = cls(conn)
        try:
            if create:
                with store.write():
                    # statement by statement: executescript() would COMMIT our transaction
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            conn.execute(statement)
                    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            else:
                store._migrate(path)
        except BaseException:
            conn.close()
            raise
        return store

    def _version(self) -> int:
        return int(self._conn.execute("PRAGMA user_version").fetchone()[0]) or 1

    def _migrate(self, path: Path) -> None:
        """Bring an older database up to SCHEMA_VERSION, once, under the write lock."""
        if self._version() == SCHEMA_VERSION:
            return
        with self.write() as conn:
            version = self._version()  # again: another process may have migrated meanwhile
            if version > SCHEMA_VERSION:
                raise StateError(
                    f"{path}: made by a newer meshid (schema {version}, this one knows "
                    f"{SCHEMA_VERSION}); nothing was changed",
                    reason="schema_too_new",
                )
            for step in range(version + 1, SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS[step]:
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {step}")

    def close(self) -> None:
        self._conn.close()

    @property
    def in_transaction(self) -> bool:
        return self._conn.in_transaction or self._writing

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One IMMEDIATE transaction: all of it lands, or none of it.

        Inside a `batch()` it is a savepoint instead: a failing request rolls
        back its own changes and leaves the batch's other requests alone.

        A failure of the host (disk full, read-only filesystem, I/O error),
        whether in a statement or at COMMIT, rolls the transaction back and
        raises `StorageUnavailable`: the caller keeps running, nothing is
        half-written.
        """
        conn = self._conn
        if self._writing:
            yield from self._savepoint(conn)
            return
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            _raise_host_failure(exc)
            raise StateError(f"authority database is busy or unwritable: {exc}") from None
        self._writing, self._broken = True, False
        try:
            yield conn
        except BaseException as exc:
            self._rollback()
            _raise_host_failure(exc)
            raise
        else:
            if self._broken:  # SQLite gave up the whole transaction under a savepoint
                self._rollback()
                raise StorageUnavailable(_UNAVAILABLE)
            self._guarded(conn, "COMMIT")
        finally:
            self._writing = False

    def _savepoint(self, conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
        if self._broken or not conn.in_transaction:
            self._broken = True
            raise StorageUnavailable(_UNAVAILABLE)
        conn.execute("SAVEPOINT request")
        try:
            yield conn
        except BaseException as exc:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK TO request")
                    conn.execute("RELEASE request")
            if not conn.in_transaction:  # on a full disk SQLite may roll back everything
                self._broken = True
            _raise_host_failure(exc)
            raise
        else:
            try:
                conn.execute("RELEASE request")
            except sqlite3.Error as exc:
                self._broken = True
                _raise_host_failure(exc)
                raise

    def _rollback(self) -> None:
        if self._conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("ROLLBACK")

    def _guarded(self, conn: sqlite3.Connection, statement: str) -> None:
        try:
            conn.execute(statement)
        except sqlite3.Error as exc:
            self._rollback()
            _raise_host_failure(exc)
            raise

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Group commit: many writes, one transaction, one fsync.

        The control plane signs concurrent requests together; durability is
        kept (synchronous=FULL) at the cost of one disk flush per batch
        rather than per certificate.
        """
        with self.write():
            yield

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """A consistent snapshot across several SELECTs.

        Inside a write() it joins that transaction, which already is one, rather
        than starting a second (SQLite refuses nested BEGINs).
        """
        conn = self._conn
        if conn.in_transaction:
            yield conn
            return
        conn.execute("BEGIN")
        try:
            yield conn
        finally:
            conn.execute("COMMIT")

    # -- small helpers used inside a transaction --

    @staticmethod
    def setting(conn: sqlite3.Connection, name: str) -> str:
        row = conn.execute("SELECT value FROM settings WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise StateError(f"authority database lacks setting {name!r}; it is damaged")
        return str(row[0])

    @staticmethod
    def counter(conn: sqlite3.Connection, name: str) -> int:
        row = conn.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
        return int(row[0]) if row else 0

    @staticmethod
    def bump(conn: sqlite3.Connection, name: str) -> int:
        conn.execute(
            "INSERT INTO counters (name, value) VALUES (?, 1) "
            "ON CONFLICT(name) DO UPDATE SET value = value + 1",
            (name,),
        )
        return Store.counter(conn, name)

    @staticmethod
    def audit(conn: sqlite3.Connection, at: float, action: str, **details: Any) -> None:
        row = conn.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
        seq, prev = (1, GENESIS_HASH) if row is None else (int(row[0]) + 1, str(row[1]))
        body = json.dumps(details, sort_keys=True, separators=(",", ":"))
        conn.execute(
            "INSERT INTO audit (seq, at, action, details, prev_hash, hash) VALUES (?,?,?,?,?,?)",
            (seq, at, action, body, prev, _row_hash(prev, seq, at, action, body)),
        )

    def audit_entries(self) -> list[AuditEntry]:
        rows = self._conn.execute(
            "SELECT seq, at, action, details, prev_hash, hash FROM audit ORDER BY seq"
        ).fetchall()
        return [
            AuditEntry(int(r[0]), float(r[1]), str(r[2]), json.loads(r[3]), str(r[4]), str(r[5]))
            for r in rows
        ]

    def verify_audit(self) -> tuple[int, str | None]:
        """(rows checked, None) when the chain holds, else (seq, what broke) at the first break."""
        rows = self._conn.execute(
            "SELECT seq, at, action, details, prev_hash, hash FROM audit ORDER BY seq"
        ).fetchall()
        prev = GENESIS_HASH
        expected_seq = 1
        for seq, at, action, details, prev_hash, stored in rows:
            if seq != expected_seq:
                return seq, f"entry {expected_seq} is missing"
            if prev_hash != prev:
                return seq, f"entry {seq} does not follow entry {seq - 1}"
            if _row_hash(prev, seq, at, action, details) != stored:
                return seq, f"entry {seq} was modified"
            prev = stored
            expected_seq += 1
        return len(rows), None
