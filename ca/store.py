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

import hashlib
import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshid.errors import StateError

DB_NAME = "authority.db"
SCHEMA_VERSION = 1
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
    instance TEXT PRIMARY KEY,                 -- one running sidecar
    spiffe_id TEXT NOT NULL,
    seen_at REAL NOT NULL,
    report TEXT NOT NULL
);
CREATE TABLE audit (
    seq INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    action TEXT NOT NULL,
    details TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
"""

COUNTERS = ("policy_version", "revocation_version", "bundle_sequence")


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
            raise StateError(f"{path}: cannot open the authority database: {exc}") from None
        store = cls(conn)
        if create:
            with store.write():
                # statement by statement: executescript() would COMMIT our transaction
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
        return store

    def close(self) -> None:
        self._conn.close()

    @property
    def in_transaction(self) -> bool:
        return self._conn.in_transaction

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One IMMEDIATE transaction: all of it lands, or none of it.

        Inside a `batch()` it is a savepoint instead: a failing request rolls
        back its own changes and leaves the batch's other requests alone.
        """
        conn = self._conn
        if conn.in_transaction:
            conn.execute("SAVEPOINT request")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK TO request")
                conn.execute("RELEASE request")
                raise
            else:
                conn.execute("RELEASE request")
            return
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise StateError(f"authority database is busy or unwritable: {exc}") from None
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        else:
            conn.execute("COMMIT")

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
