"""The storage seam: one connection protocol, and the embedded engine behind it.

Theory of operation: the authority's logic writes portable SQL with `?`
placeholders against `Connection` and never learns which engine answers.
An `Engine` owns one driver connection and the few things that differ
between engines: how a write transaction takes the authority's one write
lock, how the schema version is kept, how a DDL statement is spelled, and
which driver errors are faults of the host (`StorageUnavailable`: the caller
answers "try again later" and keeps running) rather than of the request.

Error tree of this seam:

    Exception
    └── DatabaseError         a driver error that is neither ours nor the host's
        └── Conflict          a unique or primary key already holds that value
    StorageUnavailable        (meshid.errors) the host failed: disk, network, server

Two engines: `SqliteEngine` here (one file in the state directory, the
embedded default) and `ca.pgengine.PgEngine` (PostgreSQL, for several
authority instances sharing one trust domain). `ca.backend` picks one from
the state directory.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

from meshid.errors import StateError, StorageUnavailable


class DatabaseError(Exception):
    """A driver error the authority did not expect, with the driver's first line only."""


class Conflict(DatabaseError):
    """The row would repeat a unique key: the caller says what already exists."""


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Connection(Protocol):
    """What the authority's logic may do with the database: run portable SQL."""

    def execute(self, sql: str, params: Sequence[Any] = (), /) -> Cursor: ...

    def executemany(self, sql: str, params: Iterable[Sequence[Any]], /) -> object: ...


class Engine(Protocol):
    """One driver connection, and what differs between engines (see the module docstring)."""

    name: str

    @property
    def conn(self) -> Connection: ...

    def in_transaction(self) -> bool: ...

    def begin_write(self) -> None: ...

    def begin_read(self) -> None: ...

    def commit(self) -> None: ...

    def rollback(self) -> None: ...

    def schema_version(self) -> int: ...

    def set_schema_version(self, version: int) -> None: ...

    def ddl(self, statement: str) -> str: ...

    def has_column(self, table: str, column: str) -> bool: ...

    def host_failure(self, exc: BaseException) -> str | None: ...

    def ensure_shared_objects(self) -> None: ...

    def close(self) -> None: ...


# SQLite's primary result codes for faults of the host rather than of the request
_SQLITE_HOST_FAILURES = {
    sqlite3.SQLITE_FULL: "the disk is full",
    sqlite3.SQLITE_READONLY: "the database is read-only",
    sqlite3.SQLITE_IOERR: "an I/O error",
    sqlite3.SQLITE_CANTOPEN: "a journal file cannot be opened",
    sqlite3.SQLITE_PERM: "permission denied",
}


class _SqliteConnection:
    """sqlite3 with `Conflict` in place of IntegrityError; other errors pass unchanged."""

    def __init__(self, raw: sqlite3.Connection) -> None:
        self.raw = raw

    def execute(self, sql: str, params: Sequence[Any] = (), /) -> sqlite3.Cursor:
        try:
            return self.raw.execute(sql, params)
        except sqlite3.IntegrityError as exc:
            raise Conflict(str(exc)) from None

    def executemany(self, sql: str, params: Iterable[Sequence[Any]], /) -> sqlite3.Cursor:
        try:
            return self.raw.executemany(sql, params)
        except sqlite3.IntegrityError as exc:
            raise Conflict(str(exc)) from None


class SqliteEngine:
    """The embedded engine: `BEGIN IMMEDIATE` is the write lock across processes."""

    name = "sqlite"

    def __init__(self, raw: sqlite3.Connection) -> None:
        self._conn = _SqliteConnection(raw)

    @classmethod
    def open(cls, path: Path, *, create: bool) -> SqliteEngine:
        if not create and not path.is_file():
            raise StateError(f"{path.parent}: no authority here (run 'meshid ca init')")
        try:
            raw = sqlite3.connect(path, isolation_level=None, timeout=30.0, check_same_thread=False)
            raw.execute("PRAGMA busy_timeout = 30000")
            raw.execute("PRAGMA journal_mode = WAL")
            raw.execute("PRAGMA synchronous = FULL")
            raw.execute("PRAGMA foreign_keys = ON")
        except sqlite3.Error as exc:
            conn_error = f"{path}: cannot open the authority database: {exc}"
            if sqlite_host_failure(exc) is not None:
                raise StorageUnavailable(conn_error) from None
            raise StateError(conn_error) from None
        return cls(raw)

    @property
    def conn(self) -> _SqliteConnection:
        return self._conn

    def in_transaction(self) -> bool:
        return self._conn.raw.in_transaction

    def begin_write(self) -> None:
        try:
            self._conn.raw.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            what = sqlite_host_failure(exc)
            if what is not None:
                raise StorageUnavailable(
                    f"cannot write the authority database: {what}; nothing was changed"
                ) from None
            raise StateError(f"authority database is busy or unwritable: {exc}") from None

    def begin_read(self) -> None:
        self._conn.raw.execute("BEGIN")

    def commit(self) -> None:
        self._conn.raw.execute("COMMIT")

    def rollback(self) -> None:
        if self._conn.raw.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self._conn.raw.execute("ROLLBACK")

    def schema_version(self) -> int:
        return int(self._conn.raw.execute("PRAGMA user_version").fetchone()[0]) or 1

    def set_schema_version(self, version: int) -> None:
        self._conn.raw.execute(f"PRAGMA user_version = {int(version)}")

    def ddl(self, statement: str) -> str:
        return statement

    def has_column(self, table: str, column: str) -> bool:
        rows = self._conn.raw.execute("SELECT name FROM pragma_table_info(?)", (table,))
        return any(name == column for (name,) in rows.fetchall())

    def host_failure(self, exc: BaseException) -> str | None:
        return sqlite_host_failure(exc)

    def ensure_shared_objects(self) -> None:
        """Nothing: one host's processes poll the versions and share limits in memory."""

    def close(self) -> None:
        self._conn.raw.close()


def sqlite_host_failure(exc: BaseException) -> str | None:
    """What went wrong, when `exc` is a sqlite3 error that the host caused."""
    if not isinstance(exc, sqlite3.Error):
        return None
    code = getattr(exc, "sqlite_errorcode", None)
    return _SQLITE_HOST_FAILURES.get(code & 0xFF) if isinstance(code, int) else None


def is_driver_error(exc: BaseException) -> bool:
    """Whether `exc` came from a database driver (either engine), not from our logic."""
    return isinstance(exc, DatabaseError | sqlite3.Error)
