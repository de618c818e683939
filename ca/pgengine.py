"""The PostgreSQL engine: several authority instances on different hosts, one database.

Theory of operation: the authority's SQL is written for SQLite, whose
`BEGIN IMMEDIATE` makes every write transaction the only one. Here a write
transaction takes one transaction-scoped advisory lock first
(`pg_advisory_xact_lock`), so writers on every instance serialise exactly as
SQLite writers do on one host, and each statement after the lock sees every
commit before it (READ COMMITTED). A read snapshot is REPEATABLE READ.

Statements are translated once each: `?` placeholders become `%s` (and a
literal `%` is doubled), DDL types become PostgreSQL's (REAL is single
precision there: timestamps need DOUBLE PRECISION). A unique violation is
`Conflict`; a lost or refused connection, a lock wait past its limit, or a
serialisation failure is `StorageUnavailable`, and the next transaction
reconnects. Driver messages are cut to their first line and never carry the
password (libpq may echo parts of the connection string).

psycopg 3's synchronous API: the authority already calls its store from
worker threads (`trio.to_thread`), one connection per process.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg.pq import TransactionStatus

from ca.db import Conflict, DatabaseError
from meshid.errors import StateError, StorageUnavailable

# The one write lock of a trust domain's database (an arbitrary constant: "mesh").
WRITE_LOCK_KEY = 0x6D657368
CONNECT_TIMEOUT = 5  # seconds: an unreachable database is a quick 503, not a hang
LOCK_TIMEOUT = "30s"  # as long as SQLite's busy timeout
# Objects of PostgreSQL only, beside the portable schema (`ca.schema`), installed by
# `ensure_shared_objects`. Every change a sidecar must hear of raises a row of `counters`;
# the trigger turns each such statement into a notice on CHANGES, sent when (and only
# if) its transaction commits. `enroll_failures` holds the shared failure counts of
# `ca.pgshared.DbFailureLimiter`; `audit_checkpoints` each instance's view of the audit
# chain (`ca.audit`).
CHANGES = "meshid_changes"
SHARED_OBJECTS = "2"  # settings.pg_shared_objects: raise when the statements below change
_NOTICE_TRIGGER = "meshid_counters_notify"
_SHARED_DDL = (
    f"CREATE OR REPLACE FUNCTION {_NOTICE_TRIGGER}() RETURNS trigger LANGUAGE plpgsql AS "
    f"$$ BEGIN PERFORM pg_notify('{CHANGES}', ''); RETURN NULL; END $$",
    f"CREATE OR REPLACE TRIGGER {_NOTICE_TRIGGER} AFTER INSERT OR UPDATE ON counters "
    f"FOR EACH STATEMENT EXECUTE FUNCTION {_NOTICE_TRIGGER}()",
    """CREATE TABLE IF NOT EXISTS enroll_failures (
        source TEXT PRIMARY KEY,
        window_start DOUBLE PRECISION NOT NULL,
        failures BIGINT NOT NULL,
        blocked_until DOUBLE PRECISION NOT NULL,
        last_seen DOUBLE PRECISION NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS enroll_failures_by_seen ON enroll_failures (last_seen)",
    """CREATE TABLE IF NOT EXISTS audit_checkpoints (
        instance TEXT PRIMARY KEY,
        seq BIGINT NOT NULL,
        mac TEXT NOT NULL,
        tag TEXT NOT NULL
    )""",
)

_DDL_TYPES = (
    # idempotent, so an init that died after its schema can be run again
    (re.compile(r"CREATE (TABLE|INDEX) (?!IF NOT EXISTS)"), r"CREATE \1 IF NOT EXISTS "),
    (re.compile(r"\bREAL\b"), "DOUBLE PRECISION"),
    (re.compile(r"\bINTEGER\b"), "BIGINT"),
    (re.compile(r"\bBLOB\b"), "BYTEA"),
)
_IN_TRANSACTION = (
    TransactionStatus.INTRANS,
    TransactionStatus.INERROR,
    TransactionStatus.ACTIVE,
)


def translate(sql: str) -> str:
    """SQLite's placeholders in psycopg's spelling."""
    return sql.replace("%", "%%").replace("?", "%s")


def first_line(exc: BaseException, secret: str | None) -> str:
    """The driver's words, safe to log: one line, the password cut out."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if secret:  # before the cut: a password across it would leave its first characters
        text = text.replace(secret, "***")
    return text[:200]


class _PgConnection:
    """psycopg with SQLite's placeholders and the seam's errors."""

    def __init__(self, engine: PgEngine) -> None:
        self._engine = engine
        self._sql: dict[str, str] = {}

    def _translated(self, sql: str) -> str:
        out = self._sql.get(sql)
        if out is None:
            out = self._sql[sql] = translate(sql)
        return out

    def execute(self, sql: str, params: Sequence[Any] = (), /) -> psycopg.Cursor[Any]:
        raw = self._engine.raw()
        try:
            return raw.execute(self._translated(sql), tuple(params))
        except psycopg.Error as exc:
            raise self._engine.translate_error(exc) from None

    def executemany(self, sql: str, params: Iterable[Sequence[Any]], /) -> None:
        raw = self._engine.raw()
        try:
            with raw.cursor() as cursor:
                cursor.executemany(self._translated(sql), [tuple(p) for p in params])
        except psycopg.Error as exc:
            raise self._engine.translate_error(exc) from None


class PgEngine:
    name = "postgresql"

    def __init__(self, conninfo: str, password: Callable[[], str | None]) -> None:
        self._conninfo = conninfo
        self._password_source = password  # asked again at every connection: a rotated
        self._password: str | None = None  # password takes effect without a restart
        self._raw: psycopg.Connection[Any] | None = None
        self._conn = _PgConnection(self)

    @classmethod
    def open(cls, conninfo: str, password: Callable[[], str | None]) -> PgEngine:
        engine = cls(conninfo, password)
        engine.raw()
        return engine

    # -- the driver connection, opened again after a loss --

    def raw(self) -> psycopg.Connection[Any]:
        raw = self._raw
        if raw is not None and not raw.closed and not raw.broken:
            return raw
        if raw is not None:
            with contextlib.suppress(Exception):
                raw.close()
            self._raw = None
        extra: dict[str, Any] = {}
        self._password = self._password_source()
        if self._password is not None:
            extra["password"] = self._password
        try:
            raw = psycopg.connect(
                self._conninfo,
                autocommit=True,
                connect_timeout=CONNECT_TIMEOUT,
                application_name="meshid-ca",
                options=f"-c lock_timeout={LOCK_TIMEOUT}",
                **extra,
            )
        except psycopg.Error as exc:
            raise StorageUnavailable(
                "cannot reach the authority database: "
                f"{first_line(exc, self._password)}; nothing was changed"
            ) from None
        self._raw = raw
        return raw

    def translate_error(self, exc: psycopg.Error) -> Exception:
        words = first_line(exc, self._password)
        if isinstance(exc, pg_errors.UniqueViolation):
            return Conflict(words)
        if self._lost() or isinstance(exc, psycopg.OperationalError):
            return StorageUnavailable(
                f"the authority database failed: {words}; nothing was changed"
            )
        if isinstance(exc, pg_errors.UndefinedTable):
            return StateError(
                f"the database holds no meshid trust domain ({words})", reason="state_error"
            )
        return DatabaseError(words)

    # -- the Engine protocol --

    @property
    def conn(self) -> _PgConnection:
        return self._conn

    def in_transaction(self) -> bool:
        if self._lost():
            return False
        assert self._raw is not None
        return self._raw.info.transaction_status in _IN_TRANSACTION

    def begin_write(self) -> None:
        self._begin("BEGIN", f"SELECT pg_advisory_xact_lock({WRITE_LOCK_KEY})")

    def begin_read(self) -> None:
        self._begin("BEGIN ISOLATION LEVEL REPEATABLE READ")

    def _begin(self, *statements: str) -> None:
        """Open a transaction; a connection found dead here is replaced once.

        A connection can die while idle (a server restart, a failover, an
        idle timeout) and say so only when next used. Nothing was done on it
        yet, so opening the transaction again on a new one is safe; a loss in
        the middle of a transaction is not retried: it is StorageUnavailable.
        A statement after BEGIN that fails (the write lock not had within
        LOCK_TIMEOUT) leaves no transaction open: an aborted one would refuse
        every later statement on this connection.
        """
        for attempt in (1, 2):
            try:
                for statement in statements:
                    self._conn.execute(statement)
                return
            except Exception as exc:
                self.rollback()
                if not isinstance(exc, StorageUnavailable) or attempt == 2 or not self._lost():
                    raise

    def _lost(self) -> bool:
        raw = self._raw
        return raw is None or raw.closed or raw.broken

    def commit(self) -> None:
        self._conn.execute("COMMIT")

    def rollback(self) -> None:
        if self.in_transaction():
            with contextlib.suppress(Exception):
                self._conn.execute("ROLLBACK")

    def schema_version(self) -> int:
        row = self._conn.execute(
            "SELECT value FROM settings WHERE name = 'schema_version'"
        ).fetchone()
        return 0 if row is None else int(row[0])

    def set_schema_version(self, version: int) -> None:
        self._conn.execute(
            "UPDATE settings SET value = ? WHERE name = 'schema_version'", (str(version),)
        )

    def ddl(self, statement: str) -> str:
        for pattern, replacement in _DDL_TYPES:
            statement = pattern.sub(replacement, statement)
        return statement

    def has_column(self, table: str, column: str) -> bool:
        row = self._conn.execute(
            "SELECT 1 FROM information_schema.columns WHERE table_schema = current_schema() "
            "AND table_name = ? AND column_name = ?",
            (table, column),
        ).fetchone()
        return row is not None

    def ensure_shared_objects(self) -> None:
        """Install what only PostgreSQL has (see SHARED_OBJECTS), once per database."""
        if self._shared_objects() == SHARED_OBJECTS:
            return
        self.begin_write()  # two instances starting at once install them once
        try:
            if self._shared_objects() != SHARED_OBJECTS:
                for statement in _SHARED_DDL:
                    self.raw().execute(statement)
                self._conn.execute(
                    "INSERT INTO settings (name, value) VALUES ('pg_shared_objects', ?) "
                    "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                    (SHARED_OBJECTS,),
                )
            self.commit()
        except BaseException:
            self.rollback()
            raise

    def _shared_objects(self) -> str | None:
        row = self._conn.execute(
            "SELECT value FROM settings WHERE name = 'pg_shared_objects'"
        ).fetchone()
        return None if row is None else str(row[0])

    def host_failure(self, exc: BaseException) -> str | None:
        return None  # already StorageUnavailable when raised (see translate_error)

    def close(self) -> None:
        if self._raw is not None:
            with contextlib.suppress(Exception):
                self._raw.close()
            self._raw = None
