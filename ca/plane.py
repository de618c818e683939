"""The control plane's state: options, pools, the queue, and the server's own TLS credentials.

`ca.server.ControlPlane` is this state with its behaviour layered on: ca.dispatch
(the poller, long polls, the batcher), ca.httpshell (HTTP on one stream) and
ca.server (listeners and connections). Also here: how a failure of the authority
is described and answered, shared by every layer.
"""

from __future__ import annotations

import errno
import math
import os
import ssl
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import trio

from ca import backend
from ca.adminrun import MAX_RUNS, RunSlots
from ca.api import RENEWALS_PER_IDENTITY, ControlApi, Reply, Request, error
from ca.authority import Authority
from ca.db import is_driver_error
from ca.metrics import CaMetrics, Live
from ca.retention import SvidPruner
from ca.rootkeeper import RootKeeper
from ca.ui import ServiceGraph
from ca.values import propagation_default
from meshid.clock import Clock
from meshid.errors import InvalidInput, MeshIdError, StorageUnavailable
from meshid.ratelimit import FailureLimiter, TokenBucket
from meshid.spiffeid import SpiffeId
from meshid.svid import IpAddress, certs_to_pem, generate_key, key_to_pem
from meshid.wire import AUTHORITY_PATH

if TYPE_CHECKING:
    from ca.pgshared import ChangeListener, DbFailureLimiter

SERVER_DIR = "server"
RETRY_AFTER = 5  # seconds a caller is asked to wait when the authority cannot answer
T = TypeVar("T")
A = TypeVar("A")  # what a queued request is answered with
WatchCheck = tuple[Reply | None, tuple[int, int, int]]  # ca.api.ControlApi.watch_check


@dataclass(frozen=True, slots=True)
class ServerOptions:
    host: str
    port: int
    dns_names: tuple[str, ...] = ()
    ip_addresses: tuple[IpAddress, ...] = ()
    poll_interval: float = 0.1  # reading three counters: cheap, and a change waits for it
    watch_timeout: float = 25.0
    handshake_timeout: float = 10.0
    request_timeout: float = 10.0
    idle_timeout: float = 60.0  # between requests, on a connection with a client certificate
    anonymous_idle_timeout: float = 10.0  # between requests, on one without
    max_connections: int = 4096  # anonymous connections (no client certificate), in all
    max_per_source: int = 64  # anonymous connections from one IP address
    max_authenticated: int = 16384  # connections with a client certificate of ours
    max_watches: int = 16384  # long polls parked at once, in all
    max_watches_per_identity: int = 256  # parked by one SPIFFE ID (its replicas share it)
    renewals_per_identity: int = RENEWALS_PER_IDENTITY  # per SVID lifetime (ca.api)
    auto_rotate: bool = True  # prepare and activate the next root by itself (ca.rootlife)
    metrics: tuple[str, int] | None = None  # HOST, PORT of the Prometheus listener (ca.metrics)
    ui: tuple[str, int] | None = None  # HOST, PORT of the service graph page (ca.ui)
    bundle_endpoint: tuple[str, int] | None = None  # HOST, PORT of ca.bundle_endpoint


# The admission caps an operator may size to the mesh (`meshid ca serve --limit NAME=N`).
LIMITS = (
    "max_authenticated",
    "max_connections",
    "max_per_source",
    "max_watches",
    "max_watches_per_identity",
    "renewals_per_identity",
)
MAX_LIMIT = 1_000_000


def parse_limits(items: Iterable[str]) -> dict[str, int]:
    """`NAME=N` items (the last of a name wins) as `ServerOptions` fields. Pure.

    A cap can be raised or lowered, never switched off: N is a whole number
    from 1 to MAX_LIMIT.
    """
    limits: dict[str, int] = {}
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise InvalidInput(f"--limit {item!r}: expected NAME=N")
        if name not in LIMITS:
            raise InvalidInput(f"--limit {name}: unknown; one of {', '.join(LIMITS)}")
        value = value.strip()
        if not value.isdigit() or not 1 <= int(value) <= MAX_LIMIT:
            raise InvalidInput(f"--limit {name}: must be a whole number from 1 to {MAX_LIMIT}")
        limits[name] = int(value)
    return limits


@dataclass(slots=True)
class _Credentials:
    context: ssl.SSLContext
    serial: int
    generation: int  # the root that signed it
    bundle_sequence: int
    renew_at: datetime


@dataclass(slots=True)
class PlaneState:
    """The fields of `ca.server.ControlPlane`, and its own TLS credentials."""

    authority: Authority
    options: ServerOptions
    log: Callable[..., None]
    clock: Clock
    api: ControlApi = field(init=False)
    bound: tuple[str, int] | None = None
    _creds: _Credentials | None = None
    _db: trio.CapacityLimiter = field(default_factory=lambda: trio.CapacityLimiter(1))
    _changed: trio.Event = field(default_factory=trio.Event)
    _versions: tuple[int, int, int] = (0, 0, 0)
    limiter: FailureLimiter | None = None  # shared by the workers of one server, if given
    listener: ChangeListener | None = None  # change notices from PostgreSQL (ca.pgshared)
    _own_limiter: DbFailureLimiter | None = None  # made here: closed when serving ends
    _anonymous: dict[trio.CancelScope, None] = field(default_factory=dict)  # oldest first
    _per_source: dict[str, int] = field(default_factory=dict)  # anonymous, by `_source_key`
    _authenticated: int = 0
    _watches: dict[SpiffeId, int] = field(default_factory=dict)
    _watching: int = 0
    _throttle: _Throttle = field(default_factory=lambda: _Throttle(per_second=10))
    # `request` lines of refused requests (4xx): a caller repeating a bad request
    # must not write the log at its own pace (a line says how many were left out)
    _refusal_lines: _Throttle = field(default_factory=lambda: _Throttle(per_second=20))
    # and of requests the authority failed (5xx), apart: a flood of a caller's refusals
    # must not hide the authority's own faults (a bug caught in a batch logs no other line)
    _fault_lines: _Throttle = field(default_factory=lambda: _Throttle(per_second=20))
    _signing: _Queue[Reply] = field(default_factory=lambda: _Queue())  # enroll, renew, report
    _feeds: _Queue[Reply] = field(default_factory=lambda: _Queue())  # watches a change woke
    _checks: _Queue[WatchCheck] = field(default_factory=lambda: _Queue())  # watches to park
    _runs: RunSlots = field(default_factory=lambda: RunSlots(MAX_RUNS))
    root_keeper: RootKeeper = field(init=False)
    pruner: SvidPruner = field(init=False)
    metrics: CaMetrics = field(init=False)
    graph: ServiceGraph = field(init=False)

    def __post_init__(self) -> None:
        database = backend.load(self.authority.state_dir)
        if database is not None:  # several instances: what they share lives in the database
            from ca.pgshared import ChangeListener, DbFailureLimiter

            if self.limiter is None:
                self.limiter = self._own_limiter = DbFailureLimiter.for_database(database)
            if self.listener is None:
                self.listener = ChangeListener.for_database(database)
        limiter = self.limiter if self.limiter is not None else FailureLimiter(max_failures=5)
        self.api = ControlApi(self.authority, self.clock.wall, self.clock.monotonic, limiter)
        self.api.renewals = TokenBucket(
            self.options.renewals_per_identity, self.authority.svid_ttl.total_seconds()
        )
        self.root_keeper = RootKeeper(
            self.authority,
            self.log,
            propagation_default(self.authority.svid_ttl),
            auto=self.options.auto_rotate,
        )
        self.pruner = SvidPruner(self.authority, self.log, self.clock.monotonic)
        pools = lambda: {"anonymous": len(self._anonymous), "authenticated": self._authenticated}  # noqa: E731
        self.metrics = CaMetrics(self.clock, Live(pools, lambda: self._watching))
        self.graph = ServiceGraph(self.clock)

    @property
    def identity(self) -> SpiffeId:
        return SpiffeId(self.authority.trust_domain, AUTHORITY_PATH)

    async def _db_call(self, fn: Callable[..., T], *args: Any) -> T:
        return await self.metrics.timed(trio.to_thread.run_sync(fn, *args, limiter=self._db))

    # -- the server's own certificate --

    def _issue_credentials(self) -> _Credentials:
        """Sign a fresh server SVID and build a context around it. Runs in the DB thread."""
        self.authority.advance_roots()
        key = generate_key()
        issued = self.authority.issue(
            self.identity,
            key.public_key(),
            dns_names=self.options.dns_names,
            ip_addresses=self.options.ip_addresses,
            how="issue_authority",
            internal=True,
        )
        generation, _, _ = self.authority.signer()
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        _load_chain_from_memory(context, certs_to_pem(issued.chain) + key_to_pem(key))
        context.load_verify_locations(cadata=issued.bundle.to_pem().decode())
        context.verify_mode = ssl.CERT_OPTIONAL
        leaf = issued.leaf
        lifetime = leaf.not_valid_after_utc - self.clock.wall()
        return _Credentials(
            context=context,
            serial=leaf.serial_number,
            generation=generation,
            bundle_sequence=issued.bundle.sequence,
            renew_at=self.clock.wall() + lifetime / 2,
        )

    def _credentials_stale(self) -> bool:
        creds = self._creds
        if creds is None:
            return True
        if self.clock.wall() >= creds.renew_at:
            return True
        generation, _, _ = self.authority.signer()
        return (
            generation != creds.generation
            or self.authority.bundle().sequence != creds.bundle_sequence
        )

    async def _refresh_credentials(self) -> None:
        stale = await self._db_call(self._credentials_stale)
        if not stale:
            return
        creds = await self._db_call(self._issue_credentials)
        self._creds = creds
        self.log(
            "server_certificate",
            spiffe_id=str(self.identity),
            serial=f"{creds.serial:x}",
            root_generation=creds.generation,
            bundle_sequence=creds.bundle_sequence,
        )


@dataclass(slots=True)
class _Throttle:
    """At most `per_second` events a second; counts the ones it turns away. Pure."""

    per_second: int
    _window: float = -math.inf
    _used: int = 0
    _dropped: int = 0

    def allow(self, now: float) -> int | None:
        """None to drop this one; else how many were dropped since the last allowed."""
        if now - self._window >= 1.0:
            self._window, self._used = now, 0
        if self._used >= self.per_second:
            self._dropped += 1
            return None
        self._used += 1
        dropped, self._dropped = self._dropped, 0
        return dropped


@dataclass(eq=False, slots=True)
class _Slot(Generic[A]):
    request: Request
    reply: A | None = None
    done: trio.Event = field(default_factory=trio.Event)


@dataclass(eq=False, slots=True)
class _Queue(Generic[A]):
    """Requests waiting for one call to the database thread that answers them all."""

    slots: list[_Slot[A]] = field(default_factory=list)
    queued: trio.Event = field(default_factory=trio.Event)

    async def ask(self, req: Request) -> A:
        slot: _Slot[A] = _Slot(req)
        self.slots.append(slot)
        self.queued.set()
        await slot.done.wait()
        assert slot.reply is not None
        return slot.reply

    async def wait_batch(self, most: int) -> list[_Slot[A]]:
        """The next `most` queued requests at most, waiting for one if none is queued."""
        while not self.slots:
            await self.queued.wait()
            self.queued = trio.Event()
        batch, self.slots = self.slots[:most], self.slots[most:]
        return batch


_STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EIO})


def _is_storage_failure(exc: BaseException) -> bool:
    if isinstance(exc, StorageUnavailable) or is_driver_error(exc):
        return True
    return isinstance(exc, OSError) and exc.errno in _STORAGE_ERRNOS


def _describe(exc: BaseException) -> str:
    """What failed, in words that hold no secret: ours, or SQLite's, or the OS's."""
    if isinstance(exc, MeshIdError):
        return exc.message
    if is_driver_error(exc):
        return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return type(exc).__name__


def _failure_fields(exc: BaseException) -> dict[str, str]:
    """Log fields for an exception the authority raised: a reason, its type, its words."""
    if isinstance(exc, MeshIdError):
        reason = exc.reason
    else:
        reason = "storage_unavailable" if _is_storage_failure(exc) else "internal_error"
    return {"reason": reason, "error": type(exc).__name__, "detail": _describe(exc)}


def _retry_later(reply: Reply) -> Reply:
    """A reply that says the storage failed is a 503 with Retry-After, whoever wrote it."""
    if reply.body.get("error") != "storage_unavailable" or reply.status == 503:
        return reply
    return _unavailable("storage_unavailable")


def _unavailable(reason: str) -> Reply:
    return error(
        503,
        reason,
        "the authority cannot answer now; try again later",
        retry_after=str(RETRY_AFTER),
    )


def _load_chain_from_memory(context: ssl.SSLContext, pem: bytes) -> None:
    """Load a certificate chain and its key without writing the key to any disk.

    The stdlib loads a key only from a path. An anonymous in-memory file
    (``memfd_create``), reached through ``/proc/self/fd``, is such a path: the key
    never touches the state directory, so nothing is left behind if the process
    is killed here, and a full or read-only disk does not stop the server.
    """
    fd = os.memfd_create("meshid-server-key", os.MFD_CLOEXEC)
    try:
        os.fchmod(fd, 0o600)
        view = memoryview(pem)
        while view:
            view = view[os.write(fd, view) :]
        context.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)
