"""What the instances of a trust domain on PostgreSQL share beyond its tables.

Change notices. Every change a sidecar must hear of (policy, revocation,
bundle, services, federation) raises a row of `counters`, and a trigger on
that table (`ca.pgengine`) sends a notice on `CHANGES` when its transaction
commits. Each `ca serve` process LISTENs on one connection of its own, which
does nothing else: `ChangeListener.run` waits for that connection's socket to
become readable from trio (no thread parks on it), drains every notice that
arrived, and calls `wake` once for the burst. When the connection is lost, or
cannot be made, it says why (`listen_lost`, `listen_failed`, with the
database's reason) and tries again after a backoff that doubles from
`BACKOFF_MIN` to `BACKOFF_MAX`. A notice says "something changed", never
what: the caller reads the version counters, as its poller does, so a notice
lost with a connection costs only the delay of that poller, which keeps
running as the fallback (`ca.dispatch`).

Shared failure counts. The enrollment guessing limit (`FailureLimiter`'s
rules) must hold across instances and across the worker processes of each:
`DbFailureLimiter` keeps one row per failing source in `enroll_failures`,
changed by one UPSERT per failure on a connection of its own (autocommit,
outside the authority's write lock, so a counted failure never waits for, or
is rolled back with, a request's transaction). Time is the database
server's wall clock, the one clock every instance sees alike (each host's
monotonic clock means nothing to the others). The table stays bounded: rows
idle longer than the window and the block expire, and past `MAX_SOURCES`
rows the stalest go, at most every `PRUNE_EVERY` failures; as with the
in-memory limiter, an attacker with many addresses can make it forget a
source, never grow it. If the database cannot be reached the limiter lets the
request through: the request itself then fails on the same database.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
import trio

from ca.backend import Database
from ca.pgengine import CHANGES, CONNECT_TIMEOUT, first_line
from meshid.errors import MeshIdError
from meshid.ratelimit import FailureLimiter

BACKOFF_MIN = 0.5  # seconds before the first attempt to LISTEN again
BACKOFF_MAX = 30.0
MAX_SOURCES = 10000
PRUNE_EVERY = 64  # failures between two prunes of the failure table


def _connect(database: Database, application: str) -> psycopg.Connection[Any]:
    extra: dict[str, Any] = {}
    password = database.password()
    if password is not None:
        extra["password"] = password
    return psycopg.connect(
        database.url,
        autocommit=True,
        connect_timeout=CONNECT_TIMEOUT,
        application_name=application,
        # a host that vanished is noticed within ~10 s, not at the kernel's 2 hours
        keepalives=1,
        keepalives_idle=4,
        keepalives_interval=2,
        keepalives_count=3,
        **extra,
    )


class ChangeListener:
    """LISTEN for change notices on one dedicated connection (see the module docstring)."""

    def __init__(
        self, connect: Callable[[], psycopg.Connection[Any]], secret: str | None = None
    ) -> None:
        self._connect = connect
        self._secret = secret  # cut out of the driver's words before they are logged
        self.healthy = False  # a LISTEN is in place: the poller may slow down

    @classmethod
    def for_database(cls, database: Database) -> ChangeListener:
        try:
            secret = database.password()
        except MeshIdError:
            secret = None  # unreadable: connecting says so, in words of our own
        return cls(lambda: _connect(database, "meshid-ca-listen"), secret)

    def _listen(self) -> psycopg.Connection[Any]:
        conn = self._connect()
        try:
            conn.execute(f"LISTEN {CHANGES}")
        except BaseException:
            conn.close()
            raise
        return conn

    async def run(self, wake: Callable[[], Awaitable[None]], log: Callable[..., None]) -> None:
        """Listen for ever: `wake()` after every burst of notices, and once per (re)connection."""
        delay = BACKOFF_MIN
        while True:
            try:
                conn = await self._open()
            except Exception as exc:
                log(
                    "listen_failed",
                    reason="storage_unavailable",
                    detail=self._detail(exc),
                    retry_in=delay,
                )
                await trio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)
                continue
            try:
                self.healthy = True
                log("listening", channel=CHANGES)
                await wake()  # what changed while nobody listened
                await self._follow(conn, wake)
            except (psycopg.Error, OSError) as exc:
                log(
                    "listen_lost",
                    reason="storage_unavailable",
                    detail=self._detail(exc),
                    retry_in=delay,
                )
            finally:
                self.healthy = False
                with contextlib.suppress(Exception):
                    conn.close()
            await trio.sleep(delay)  # a database that drops every connection is not hammered
            delay = min(delay * 2, BACKOFF_MAX)

    async def _open(self) -> psycopg.Connection[Any]:
        """A LISTENing connection, made in a thread; cancelling does not wait for it and
        does not leak it (whichever side comes second closes it)."""
        lock = threading.Lock()
        made: list[psycopg.Connection[Any]] = []
        abandoned = False

        def work() -> psycopg.Connection[Any]:
            conn = self._listen()
            with lock:
                if abandoned:
                    conn.close()
                else:
                    made.append(conn)
            return conn

        try:
            return await trio.to_thread.run_sync(work, abandon_on_cancel=True)
        except trio.Cancelled:
            with lock:
                abandoned = True
                for conn in made:
                    conn.close()
            raise

    def _detail(self, exc: Exception) -> str:
        if isinstance(exc, MeshIdError):
            return exc.message
        return first_line(exc, self._secret)

    @staticmethod
    async def _follow(conn: psycopg.Connection[Any], wake: Callable[[], Awaitable[None]]) -> None:
        """Drain notices as they come; return never, raise when the connection is lost."""
        pg = conn.pgconn
        fd = pg.socket
        while True:
            await trio.lowlevel.wait_readable(fd)
            pg.consume_input()  # raises OperationalError once the server has gone
            heard = False
            while pg.notifies() is not None:
                heard = True
            if heard:
                await wake()


class DbFailureLimiter(FailureLimiter):
    """`FailureLimiter`'s rules over one table every instance and worker shares.

    The window is fixed rather than sliding: a source's count starts at its
    first failure and restarts once `window` has passed since then, which
    takes one statement per failure.
    """

    def __init__(
        self,
        connect: Callable[[], psycopg.Connection[Any]],
        max_failures: int = 5,
        window: float = 60.0,
        block: float = 60.0,
    ) -> None:
        super().__init__(max_failures=max_failures, window=window, block=block)
        self._connect_fn = connect
        self._conn: psycopg.Connection[Any] | None = None
        self._lock = threading.Lock()
        self._failures_seen = 0

    @classmethod
    def for_database(cls, database: Database, max_failures: int = 5) -> DbFailureLimiter:
        return cls(lambda: _connect(database, "meshid-ca-limits"), max_failures=max_failures)

    def _run(self, sql: str, params: dict[str, Any]) -> list[tuple[Any, ...]] | None:
        """Rows of one statement, or None when the database cannot answer (we fail open)."""
        with self._lock:
            try:
                conn = self._conn
                if conn is None or conn.closed or conn.broken:
                    conn = self._conn = self._connect_fn()
                cursor = conn.execute(sql, params)
                return cursor.fetchall() if cursor.description is not None else []
            except psycopg.Error:
                if self._conn is not None and (self._conn.closed or self._conn.broken):
                    self._conn = None
                return None

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                with contextlib.suppress(Exception):
                    self._conn.close()
                self._conn = None

    def blocked(self, source: str, now: float) -> float:
        """Seconds `source` must still wait (0 when it may try); `now` is not used (see above)."""
        rows = self._run(
            "SELECT blocked_until - extract(epoch FROM clock_timestamp()) "
            "FROM enroll_failures WHERE source = %(source)s",
            {"source": source},
        )
        if not rows:
            return 0.0
        return max(0.0, float(rows[0][0]))

    def failed(self, source: str, now: float) -> bool:
        """Record a failure; True when it tips `source` into being blocked."""
        rows = self._run(_UPSERT, self._params(source))
        self._failures_seen += 1
        if self._failures_seen % PRUNE_EVERY == 0:
            self._run(_PRUNE, {"idle": self.window + self.block, "keep": MAX_SOURCES})
        return bool(rows and rows[0][0])

    def _params(self, source: str) -> dict[str, Any]:
        return {
            "source": source,
            "max": self.max_failures,
            "window": self.window,
            "block": self.block,
        }

    def active(self, now: float) -> dict[str, float]:
        """Every source blocked now, with the seconds it has left."""
        rows = self._run(
            "SELECT source, blocked_until - extract(epoch FROM clock_timestamp()) "
            "FROM enroll_failures WHERE blocked_until > extract(epoch FROM clock_timestamp())",
            {},
        )
        return {str(source): float(left) for source, left in rows or ()}


# One statement per failure: count it (afresh once the window has passed), and block the
# source when the count reaches the limit (the count then starts again from nothing).
_EXPIRED = "f.window_start <= excluded.last_seen - %(window)s"
_COUNT = f"(CASE WHEN {_EXPIRED} THEN 1 ELSE f.failures + 1 END)"
_TIPPED = f"({_COUNT} >= %(max)s)"
_UPSERT = f"""
WITH now AS (SELECT extract(epoch FROM clock_timestamp())::double precision AS t)
INSERT INTO enroll_failures AS f (source, window_start, failures, blocked_until, last_seen)
SELECT %(source)s, now.t,
       CASE WHEN 1 >= %(max)s THEN 0 ELSE 1 END,
       CASE WHEN 1 >= %(max)s THEN now.t + %(block)s ELSE 0 END,
       now.t
FROM now
ON CONFLICT (source) DO UPDATE SET
    failures = CASE WHEN {_TIPPED} THEN 0 ELSE {_COUNT} END,
    window_start = CASE WHEN {_EXPIRED} OR {_TIPPED}
        THEN excluded.last_seen ELSE f.window_start END,
    blocked_until = CASE WHEN {_TIPPED}
        THEN excluded.last_seen + %(block)s ELSE f.blocked_until END,
    last_seen = excluded.last_seen
RETURNING blocked_until = last_seen + %(block)s
"""  # noqa: S608 - built from the constants above only

_PRUNE = """
DELETE FROM enroll_failures
WHERE last_seen < extract(epoch FROM clock_timestamp()) - %(idle)s
   OR source IN (SELECT source FROM enroll_failures ORDER BY last_seen DESC OFFSET %(keep)s)
"""
