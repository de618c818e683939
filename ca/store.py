"""The authority's database: SQLite in the state directory, or a shared PostgreSQL.

Every change runs in one write transaction that holds the database's one
write lock (SQLite's `BEGIN IMMEDIATE`, or PostgreSQL's advisory lock: see
ca.db and ca.pgengine), so concurrent CLI invocations, control-plane servers
and instances on other hosts serialise instead of racing: a join token is
consumed by exactly one caller, a version number is raised exactly once per
change, and an audit row lands in the same transaction as the change it records.

The tables are in `ca.schema`; the audit chain, and what it proves, in `ca.audit`.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ca.audit import (
    AUDIT_HEAD,
    AUDIT_KEY,
    GENESIS_HASH,
    AuditEntry,
    AuditKey,
    _row_hash,
    _row_mac,
    checkpoint_tag,
    read_head,
)
from ca.db import Connection, Engine, SqliteEngine
from ca.schema import _MIGRATIONS, _SCHEMA, ADDED_COLUMNS, SCHEMA_VERSION
from meshid.clock import Clock
from meshid.errors import StateError, StorageUnavailable
from meshid.files import write_atomic

DB_NAME = "authority.db"


_UNAVAILABLE = "cannot write the authority database; nothing was changed"


class Store:
    """A connection to the authority database, used by one thread at a time.

    The control plane calls it from worker threads; `_lock` makes "one at a
    time" a fact rather than a convention, and lets `close()` wait for the
    transaction in flight: closing an SQLite connection under a statement that
    another thread is stepping frees memory that statement still uses.
    """

    def __init__(self, engine: Engine, state_dir: Path, clock: Clock) -> None:
        self._engine = engine
        self._lock = threading.RLock()  # held by each outermost transaction, and by close()
        self._closed = False
        self._conn = engine.conn
        self._clock = clock  # dates the rows a migration adds
        self._state_dir = state_dir
        self._writing = False  # inside write(): a nested write() is a savepoint
        self._broken = False  # the open transaction was lost to a host failure
        self._audit_key: AuditKey | None = None
        self._head: tuple[int, str] | None = None  # the newest row this transaction added
        self.instance = ""  # one of several instances: it checkpoints the chain (ca.audit)

    @classmethod
    def open(cls, path: Path, *, create: bool = False, clock: Clock) -> Store:
        """The SQLite database at `path` (the embedded engine)."""
        return cls.attach(SqliteEngine.open(path, create=create), path.parent, create, clock)

    @classmethod
    def attach(cls, engine: Engine, state_dir: Path, create: bool, clock: Clock) -> Store:
        """A store on an open engine: its schema created, or migrated to this version."""
        store = cls(engine, state_dir, clock)
        try:
            if create:
                with store.write() as conn:
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            conn.execute(engine.ddl(statement))
                    engine.set_schema_version(SCHEMA_VERSION)
                    store._audit_key = AuditKey.create(state_dir, keyed_from=1)
            else:
                store._migrate(state_dir)
                store._audit_key = AuditKey.load(state_dir)
            engine.ensure_shared_objects()
        except BaseException:
            engine.close()
            raise
        return store

    @property
    def engine_name(self) -> str:
        return self._engine.name

    def _version(self) -> int:
        return self._engine.schema_version()

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
                for table, column, spec in ADDED_COLUMNS.get(step, ()):
                    if not self._engine.has_column(table, column):
                        conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {spec}")
                for statement in _MIGRATIONS[step]:
                    conn.execute(self._engine.ddl(statement))
                if step == 3:
                    self._key_audit_chain(conn)
                self._engine.set_schema_version(step)

    def _key_audit_chain(self, conn: Connection) -> None:
        """Put the chain under a key from here on; the rows so far stay plain links."""
        last = conn.execute("SELECT MAX(seq) FROM audit").fetchone()[0]
        self._audit_key = AuditKey.create(self._state_dir, keyed_from=int(last or 0) + 1)
        self.audit(
            conn,
            self._clock.wall().timestamp(),
            "audit_keyed",
            keyed_from=self._audit_key.keyed_from,
        )

    def close(self) -> None:
        """Close the connection once no transaction is in flight; later use is refused."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._engine.close()

    @contextmanager
    def _held(self) -> Iterator[None]:
        with self._lock:
            if self._closed:
                raise StateError("the authority database is closed")
            yield

    @property
    def in_transaction(self) -> bool:
        return self._engine.in_transaction() or self._writing

    def _raise_host_failure(self, exc: BaseException) -> None:
        """Raise StorageUnavailable in place of a driver error that the host caused."""
        what = self._engine.host_failure(exc)
        if what is not None:
            raise StorageUnavailable(
                f"cannot write the authority database: {what}; nothing was changed"
            ) from None

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """One IMMEDIATE transaction: all of it lands, or none of it.

        Inside a `batch()` it is a savepoint instead: a failing request rolls
        back its own changes and leaves the batch's other requests alone.

        A failure of the host (disk full, read-only filesystem, I/O error),
        whether in a statement or at COMMIT, rolls the transaction back and
        raises `StorageUnavailable`: the caller keeps running, nothing is
        half-written.
        """
        with self._held():
            conn = self._conn
            if self._writing:
                yield from self._savepoint(conn)
                return
            self._engine.begin_write()
            self._writing, self._broken, self._head = True, False, None
            try:
                yield conn
            except BaseException as exc:
                self._rollback()
                self._raise_host_failure(exc)
                raise
            else:
                if self._broken:  # SQLite gave up the whole transaction under a savepoint
                    self._rollback()
                    raise StorageUnavailable(_UNAVAILABLE)
                head = self._head
                if head is not None and self.instance:
                    self._guarded(lambda: self._checkpoint(conn, *head))
                self._guarded(self._engine.commit)
                if self._head is not None:
                    self._record_head(*self._head)
            finally:
                self._writing, self._head = False, None

    def _checkpoint(self, conn: Connection, seq: int, mac: str) -> None:
        """This instance's newest row, for every other instance to check against."""
        assert self._audit_key is not None  # audit() refused to add a row without it
        conn.execute(
            "INSERT INTO audit_checkpoints (instance, seq, mac, tag) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (instance) DO UPDATE SET seq = excluded.seq, mac = excluded.mac, "
            "tag = excluded.tag",
            (self.instance, seq, mac, checkpoint_tag(self._audit_key.key, self.instance, seq, mac)),
        )

    def witness_audit(self) -> int | None:
        """Record the chain's newest row in this instance's head file, if its MAC holds.

        Another instance's rows, once witnessed, cannot be cut off unnoticed here
        (see ca.audit). Returns the seq recorded, or None.
        """
        key = self._audit_key
        if key is None:
            return None
        with self.read() as conn:
            row = conn.execute(
                "SELECT seq, at, action, details, prev_hash, hash FROM audit "
                "ORDER BY seq DESC LIMIT 1"
            ).fetchone()
        if row is None or int(row[0]) < key.keyed_from:
            return None
        seq, at, action, details, prev, mac = int(row[0]), row[1], row[2], row[3], row[4], row[5]
        good = _row_mac(key.key, str(prev), seq, float(at), str(action), str(details))
        if not hmac.compare_digest(good, str(mac)):
            return None  # a forged row: verification names it
        self._record_head(seq, str(mac))
        return seq

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

    def _savepoint(self, conn: Connection) -> Iterator[Connection]:
        if self._broken or not self._engine.in_transaction():
            self._broken = True
            raise StorageUnavailable(_UNAVAILABLE)
        conn.execute("SAVEPOINT request")
        head = self._head
        try:
            yield conn
        except BaseException as exc:
            self._head = head  # this request's audit rows are gone with it
            if self._engine.in_transaction():
                with contextlib.suppress(Exception):
                    conn.execute("ROLLBACK TO request")
                    conn.execute("RELEASE request")
            if not self._engine.in_transaction():  # on a full disk SQLite may roll back all
                self._broken = True
            self._raise_host_failure(exc)
            raise
        else:
            try:
                conn.execute("RELEASE request")
            except Exception as exc:
                self._broken = True
                self._raise_host_failure(exc)
                raise

    def _rollback(self) -> None:
        self._engine.rollback()

    def _guarded(self, step: Callable[[], None]) -> None:
        try:
            step()
        except Exception as exc:
            self._rollback()
            self._raise_host_failure(exc)
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
    def read(self) -> Iterator[Connection]:
        """A consistent snapshot across several SELECTs.

        Inside a write() it joins that transaction, which already is one, rather
        than starting a second (SQLite refuses nested BEGINs).
        """
        with self._held():
            conn = self._conn
            if self._engine.in_transaction():
                yield conn
                return
            self._engine.begin_read()
            try:
                yield conn
            finally:
                self._engine.commit()

    # -- small helpers used inside a transaction --

    @staticmethod
    def setting(conn: Connection, name: str) -> str:
        row = conn.execute("SELECT value FROM settings WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise StateError(f"authority database lacks setting {name!r}; it is damaged")
        return str(row[0])

    @staticmethod
    def counter(conn: Connection, name: str) -> int:
        row = conn.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
        return int(row[0]) if row else 0

    @staticmethod
    def bump(conn: Connection, name: str) -> int:
        conn.execute(
            "INSERT INTO counters (name, value) VALUES (?, 1) "
            "ON CONFLICT(name) DO UPDATE SET value = counters.value + 1",
            (name,),
        )
        return Store.counter(conn, name)

    def audit(self, conn: Connection, at: float, action: str, **details: Any) -> None:
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
        with self.read() as conn:
            rows = conn.execute(
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
        if self.instance:
            broken = self._verify_checkpoints(key, macs, last)
            if broken is not None:
                return broken
        return len(rows), None

    def _verify_checkpoints(
        self, key: AuditKey, macs: dict[int, str], last: int
    ) -> tuple[int, str] | None:
        """Every instance's checkpoint is genuine and names a row that is there (ca.audit)."""
        with self.read() as conn:
            points = conn.execute(
                "SELECT instance, seq, mac, tag FROM audit_checkpoints ORDER BY instance"
            ).fetchall()
            names = [str(r[0]) for r in conn.execute("SELECT name FROM instances").fetchall()]
        seen: set[str] = set()
        for instance, seq, mac, tag in points:
            instance, seq, mac = str(instance), int(seq), str(mac)
            seen.add(instance)
            if not hmac.compare_digest(checkpoint_tag(key.key, instance, seq, mac), str(tag)):
                return seq, f"the checkpoint of instance {instance} was forged or modified"
            if seq > last:
                return last + 1, (
                    f"entries {last + 1} to {seq} are missing: the log was cut short "
                    f"(instance {instance} wrote entry {seq})"
                )
            if not hmac.compare_digest(macs.get(seq, ""), mac):
                return seq, f"entry {seq} does not match the checkpoint of instance {instance}"
        missing = sorted(set(names) - seen)
        if missing:
            return last, f"the checkpoint of instance {missing[0]} is missing"
        return None
