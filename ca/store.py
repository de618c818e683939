"""The authority's database: one SQLite file in the state directory.

Every change runs in one `BEGIN IMMEDIATE` transaction, so concurrent CLI
invocations and the control-plane server serialise on SQLite's write lock
instead of racing: a join token is consumed by exactly one caller, a version
number is raised exactly once per change, and an audit row lands in the same
transaction as the change it records.

The audit chain, and what it proves
-----------------------------------
Each audit row carries a MAC over the previous row's MAC and its own content
(seq, time, action, details): HMAC-SHA256 under a random 256-bit key kept in
``audit.key`` (mode 0600, in the state directory, never in the database).
After every transaction that adds rows, the newest (seq, MAC) is written to
``audit.head``, also outside the database. `verify_audit` recomputes the
chain and checks that the row named by the head is there with that MAC.

Against someone who can write the database but not those two files, this
detects: an edited row (its MAC, or the next row's link, breaks even when
every later MAC is recomputed, since that needs the key), a deleted or
reordered row (a gap or a broken link), and newest rows cut off (the head
names a row that is gone). It does not protect against someone who can also
read ``audit.key`` (they can rewrite the whole chain) or write ``audit.head``
(they can truncate to any earlier row); nor does it detect the loss of rows
written in the instant between a commit and the head update (the head is a
lower bound: crash-safe, never ahead of the database).

Chains from before the key existed (schema version 2 and older) are kept:
their rows stay plain SHA-256 links and are verified so; the key file records
`keyed_from`, the first seq under the key, and the migration appends an
``audit_keyed`` row, so the old rows are then pinned by the first MAC'd link.
An existing key file is never replaced: rolling the database's schema version
back does not make the keyed rows unkeyed.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import secrets
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshid.errors import StateError, StorageUnavailable
from meshid.files import write_atomic

DB_NAME = "authority.db"
SCHEMA_VERSION = 3  # kept in PRAGMA user_version; 0 there is a version-1 database
GENESIS_HASH = "0" * 64
AUDIT_KEY = "audit.key"
AUDIT_HEAD = "audit.head"

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
    3: (  # the audit chain under a key kept outside the database (see _key_audit_chain)
        "UPDATE settings SET value = '3' WHERE name = 'schema_version'",
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


def _row_body(prev_hash: str, seq: int, at: float, action: str, details: str) -> bytes:
    return json.dumps([prev_hash, seq, repr(at), action, details], separators=(",", ":")).encode()


def _row_hash(prev_hash: str, seq: int, at: float, action: str, details: str) -> str:
    """The link of a row from before the audit key: anyone can recompute it."""
    return hashlib.sha256(_row_body(prev_hash, seq, at, action, details)).hexdigest()


def _row_mac(key: bytes, prev: str, seq: int, at: float, action: str, details: str) -> str:
    """The link of a row under the audit key."""
    return hmac.new(key, _row_body(prev, seq, at, action, details), hashlib.sha256).hexdigest()


@dataclass(frozen=True, slots=True)
class AuditKey:
    key: bytes
    keyed_from: int  # the first seq linked by MAC; older rows are plain SHA-256

    @classmethod
    def load(cls, state_dir: Path) -> AuditKey | None:
        try:
            doc = json.loads((state_dir / AUDIT_KEY).read_text())
            key, keyed_from = bytes.fromhex(doc["key"]), int(doc["keyed_from"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise StateError(
                f"{state_dir / AUDIT_KEY}: unreadable audit key ({type(exc).__name__})",
                reason="audit_key_unreadable",
            ) from None
        if len(key) < 32 or keyed_from < 1:
            raise StateError(
                f"{state_dir / AUDIT_KEY}: not an audit key", reason="audit_key_unreadable"
            )
        return cls(key, keyed_from)

    @classmethod
    def create(cls, state_dir: Path, keyed_from: int) -> AuditKey:
        """A new key, written 0600 from the first byte; an existing key file wins."""
        made = cls(secrets.token_bytes(32), keyed_from)
        doc = json.dumps({"key": made.key.hex(), "keyed_from": keyed_from}).encode()
        try:
            fd = os.open(state_dir / AUDIT_KEY, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            existing = cls.load(state_dir)
            assert existing is not None
            return existing
        except OSError as exc:
            raise StorageUnavailable(f"cannot write the audit key: {exc.strerror}") from None
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(doc)
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as exc:
            (state_dir / AUDIT_KEY).unlink(missing_ok=True)
            raise StorageUnavailable(f"cannot write the audit key: {exc.strerror}") from None
        return made


def read_head(state_dir: Path) -> tuple[int, str] | None:
    """The newest (seq, MAC) recorded outside the database, if any."""
    try:
        doc = json.loads((state_dir / AUDIT_HEAD).read_text())
        return int(doc["seq"]), str(doc["mac"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return (-1, "")


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

    def __init__(self, conn: sqlite3.Connection, state_dir: Path) -> None:
        self._conn = conn
        self._state_dir = state_dir
        self._writing = False  # inside write(): a nested write() is a savepoint
        self._broken = False  # the open transaction was lost to a host failure
        self._audit_key: AuditKey | None = None
        self._head: tuple[int, str] | None = None  # the newest row this transaction added

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
        store = cls(conn, path.parent)
        try:
            if create:
                with store.write():
                    # statement by statement: executescript() would COMMIT our transaction
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            conn.execute(statement)
                    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                    store._audit_key = AuditKey.create(path.parent, keyed_from=1)
            else:
                store._migrate(path)
                store._audit_key = AuditKey.load(path.parent)
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
                if step == 3:
                    self._key_audit_chain(conn)
                conn.execute(f"PRAGMA user_version = {step}")

    def _key_audit_chain(self, conn: sqlite3.Connection) -> None:
        """Put the chain under a key from here on; the rows so far stay plain links."""
        last = conn.execute("SELECT MAX(seq) FROM audit").fetchone()[0]
        self._audit_key = AuditKey.create(self._state_dir, keyed_from=int(last or 0) + 1)
        self.audit(conn, time.time(), "audit_keyed", keyed_from=self._audit_key.keyed_from)

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
        self._writing, self._broken, self._head = True, False, None
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
            if self._head is not None:
                self._record_head(*self._head)
        finally:
            self._writing, self._head = False, None

    def _record_head(self, seq: int, mac: str) -> None:
        """Note the chain's newest row outside the database (never moving it backwards).

        After the commit: the head may lag the database by the rows of a
        crash in between, never lead it.
        """
        current = read_head(self._state_dir)
        if current is not None and current[0] >= seq:
            return
        doc = json.dumps({"seq": seq, "mac": mac}).encode()
        with contextlib.suppress(OSError):  # the head is a lower bound; the data is committed
            write_atomic(self._state_dir / AUDIT_HEAD, doc, mode=0o600)

    def _savepoint(self, conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
        if self._broken or not conn.in_transaction:
            self._broken = True
            raise StorageUnavailable(_UNAVAILABLE)
        conn.execute("SAVEPOINT request")
        head = self._head
        try:
            yield conn
        except BaseException as exc:
            self._head = head  # this request's audit rows are gone with it
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

    def audit(self, conn: sqlite3.Connection, at: float, action: str, **details: Any) -> None:
        """Append one row to the chain, inside the caller's transaction."""
        key = self._audit_key
        if key is None:
            raise StateError(
                f"{self._state_dir / AUDIT_KEY} is missing: the audit chain cannot be extended",
                reason="audit_key_missing",
            )
        row = conn.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
        seq, prev = (1, GENESIS_HASH) if row is None else (int(row[0]) + 1, str(row[1]))
        body = json.dumps(details, sort_keys=True, separators=(",", ":"))
        mac = _row_mac(key.key, prev, seq, at, action, body)
        conn.execute(
            "INSERT INTO audit (seq, at, action, details, prev_hash, hash) VALUES (?,?,?,?,?,?)",
            (seq, at, action, body, prev, mac),
        )
        self._head = (seq, mac)

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
        key = AuditKey.load(self._state_dir)
        if key is None:
            return 0, f"the audit key {AUDIT_KEY} is missing: the chain cannot be checked"
        with self.read() as conn:
            rows = conn.execute(
                "SELECT seq, at, action, details, prev_hash, hash FROM audit ORDER BY seq"
            ).fetchall()
        prev = GENESIS_HASH
        expected_seq = 1
        macs: dict[int, str] = {}
        for seq, at, action, details, prev_hash, stored in rows:
            if seq != expected_seq:
                return seq, f"entry {expected_seq} is missing"
            if prev_hash != prev:
                return seq, f"entry {seq} does not follow entry {seq - 1}"
            if seq >= key.keyed_from:
                good = hmac.compare_digest(
                    _row_mac(key.key, prev, seq, at, action, details), str(stored)
                )
            else:
                good = _row_hash(prev, seq, at, action, details) == stored
            if not good:
                return seq, f"entry {seq} was modified"
            macs[seq] = str(stored)
            prev = str(stored)
            expected_seq += 1
        head = read_head(self._state_dir)
        last = expected_seq - 1
        if head is None:
            if last >= key.keyed_from:
                return last, f"the chain head record {AUDIT_HEAD} is missing"
        elif head[0] < 0:
            return last, f"the chain head record {AUDIT_HEAD} is unreadable"
        elif head[0] > last:
            return last + 1, (f"entries {last + 1} to {head[0]} are missing: the log was cut short")
        elif not hmac.compare_digest(macs.get(head[0], ""), head[1]):
            return head[0], f"entry {head[0]} does not match the chain head record"
        return len(rows), None
