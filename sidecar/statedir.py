"""The dynamic sidecar's state directory: what survives a restart, and how a host fault is borne.

Theory of operation:

- Memory is the truth; the directory is a copy that may lag behind it. A new
  SVID, bundle or allow-list is installed first and written second, so a full
  or read-only disk can delay what a restart would find, never what is
  enforced now: a deny takes effect whether or not it could be saved.
- Three kinds of write: ``identity`` (key, chain and bundle), ``bundle`` and
  ``feed``. A write that fails for a reason of the host (disk full, read-only
  filesystem, permission denied, an I/O error) is logged as
  ``state_write_failed`` with reason ``storage_unavailable``, the kind and the
  errno name, counted, and the kind is marked pending. A retry writes what
  is *current* for each pending kind, so a late retry never puts something
  older over something newer. With nothing pending the directory is writable
  again (``state_write_recovered``).
- ``svid.key`` holds the key and, after it, the chain it belongs to, so one
  rename commits the pair: whatever fails or crashes, a restart finds a key
  with its own certificate, the old pair or the new one, never a mix.
  ``svid.pem`` is a copy of the chain for tools; a restart prefers the chain in
  the key file. The bundle goes first: it is written before a certificate
  that may need its new root.
- Every file is staged beside its target and renamed over it
  (`meshid.files.write_atomic`); staging files a crash left behind are removed
  at start, so repeated crashes cannot fill the disk.
- Nothing that serves or enforces waits on the disk: a change asks for a
  save (`request`) and one writer task (`run`) does the I/O in a worker
  thread, one file group at a time, each computing its contents when it
  starts. A busy fsync, or a failing disk that takes seconds to say so,
  stalls neither the connections nor the next policy change; and the last
  write to finish is always of the newest state.
"""

from __future__ import annotations

import errno
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshid.bundle import TrustBundle
from meshid.errors import ConfigError, StorageUnavailable
from meshid.events import EventLog
from meshid.files import is_temp_of, write_atomic, write_private
from meshid.svid import PrivateKey, certs_from_pem, key_from_pem, key_to_pem

SVID_FILE = "svid.pem"
KEY_FILE = "svid.key"
BUNDLE_FILE = "bundle.pem"
FEED_FILE = "feed.json"
FILES = (SVID_FILE, KEY_FILE, BUNDLE_FILE, FEED_FILE)

IDENTITY = "identity"
BUNDLE = "bundle"
FEED = "feed"
STATE_DIR = "state_dir"  # the directory itself (mode, clean-up at start)
KINDS = (IDENTITY, BUNDLE, FEED, STATE_DIR)
STORAGE_UNAVAILABLE: str = StorageUnavailable.reason
INTERNAL_ERROR = "internal_error"


def errno_name(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, "EIO")


def _cause(exc: Exception) -> str:
    """The errno name of a host fault; `internal_error` for anything else (a bug of ours)."""
    return errno_name(exc) if isinstance(exc, OSError) else INTERNAL_ERROR


def chain_pem(chain: tuple[x509.Certificate, ...] | list[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)


def identity_pem(key: PrivateKey, chain: tuple[x509.Certificate, ...]) -> bytes:
    """The key file's contents: the key, then the chain it belongs to."""
    return key_to_pem(key) + chain_pem(chain)


class StateDir:
    def __init__(self, path: Path, events: EventLog) -> None:
        self.path = path
        self.events = events
        # kind -> (how to write what is current, errno name of the last failure)
        self.pending: dict[str, tuple[Callable[[], None], str]] = {}
        self.failures: dict[str, int] = dict.fromkeys(KINDS, 0)
        self._dirty: dict[str, Callable[[], None]] = {}  # kinds to write, in order asked
        self._fresh: set[str] = set()  # kinds asked for since their last attempt
        self._wake = trio.Event()
        self._idle = trio.Event()
        self._idle.set()

    def file(self, name: str) -> Path:
        return self.path / name

    # -- start --

    def prepare(self) -> None:
        """Create the directory (0700) and remove staging files a crash left behind.

        Only a directory that does not exist and cannot be created is fatal:
        a read-only or full one may still hold a good SVID to serve with.
        """
        try:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            if not self.path.is_dir():
                raise ConfigError(
                    f"authority.state_dir: cannot use {self.path}: {exc.strerror}",
                    reason="state_dir",
                ) from None
        try:
            if self.path.stat().st_mode & 0o077:
                self.path.chmod(0o700)
            for entry in self.path.iterdir():
                if any(is_temp_of(entry, name) for name in FILES):
                    entry.unlink(missing_ok=True)
        except OSError as exc:
            self._report(STATE_DIR, exc, "prepare")  # nothing to retry: the next write will say

    # -- reading (at start) --

    def has_identity(self) -> bool:
        """False only when there is certainly none; an error is for `read_identity` to say."""
        try:
            return self.file(SVID_FILE).exists() or self.file(KEY_FILE).exists()
        except OSError:  # exists() raises for EACCES and EIO, not only for a missing file
            return True

    def read_identity(self) -> tuple[list[x509.Certificate], PrivateKey, bytes]:
        """The persisted chain, key and bundle PEM. Raises OSError or MeshIdError."""
        key_data = self.file(KEY_FILE).read_bytes()
        key = key_from_pem(key_data, None, "persisted key")
        try:
            chain = x509.load_pem_x509_certificates(key_data)
        except ValueError:  # a key file of an older version: the key alone
            chain = certs_from_pem(self.file(SVID_FILE).read_bytes(), "persisted SVID")
        return chain, key, self.file(BUNDLE_FILE).read_bytes()

    def read_feed(self) -> object:
        """feed.json as JSON; `meshid.feedwire.Feed.parse` says whether it is a feed."""
        return json.loads(self.file(FEED_FILE).read_text())

    # -- writing --

    def write_identity(
        self, key: PrivateKey, chain: tuple[x509.Certificate, ...], bundle: TrustBundle
    ) -> None:
        write_atomic(self.file(BUNDLE_FILE), bundle.to_pem())
        write_private(self.file(KEY_FILE), identity_pem(key, chain))
        write_atomic(self.file(SVID_FILE), chain_pem(chain))

    def write_bundle(self, bundle: TrustBundle) -> None:
        write_atomic(self.file(BUNDLE_FILE), bundle.to_pem())

    def write_feed(self, doc: dict[str, Any]) -> None:
        write_atomic(self.file(FEED_FILE), json.dumps(doc).encode())

    def request(self, what: str, write: Callable[[], None]) -> None:
        """Ask for `what` to be saved: `write` writes what is current for it, when it runs.

        Returns at once; the writer task (`run`) does the I/O. Nothing that
        enforces policy or serves peers ever waits on the disk.
        """
        self._dirty[what] = write
        self._fresh.add(what)
        self._idle = trio.Event() if self._idle.is_set() else self._idle
        self._wake.set()

    async def flush(self) -> bool:
        """Write every kind asked for or still failing, one at a time, in a thread.

        True if all were written.
        """
        for what, (write, _) in self.pending.items():
            self._dirty.setdefault(what, write)
        ok = True
        while self._dirty:
            what, write = next(iter(self._dirty.items()))
            del self._dirty[what]
            fresh = what in self._fresh
            self._fresh.discard(what)
            try:
                # A hung disk must not hold up shutdown: on cancel the thread is let go.
                await trio.to_thread.run_sync(write, abandon_on_cancel=True)
            except Exception as exc:  # the writer task must outlive any one write
                self._failed_write(what, write, exc, fresh)
                ok = False
                continue
            if self.pending.pop(what, None) is not None:
                self.events.emit("state_write_recovered", what=what, state_dir=str(self.path))
        return ok

    async def run(self, retry_delay: Callable[[int], float]) -> None:
        """The writer task: save what is asked for; retry failures after `retry_delay(n)`.

        A new request cuts a backoff short, so freeing space and the next
        change arriving is enough to save everything at once.
        """
        failures = 0
        while True:
            self._wake = trio.Event()  # before looking: a request from here on is not missed
            if not self._dirty and not self.pending:
                self._idle.set()
                await self._wake.wait()
                continue
            if await self.flush():
                failures = 0
                continue
            failures += 1
            with trio.move_on_after(retry_delay(failures)):
                await self._wake.wait()

    async def wait_saved(self) -> None:
        """Return once nothing is waiting to be written (what failed counts as waiting)."""
        await self._idle.wait()

    def _failed_write(
        self, what: str, write: Callable[[], None], exc: Exception, fresh: bool
    ) -> None:
        before = self.pending.get(what)
        self.pending[what] = (write, _cause(exc))
        # Every new state that could not be saved is logged; a retry that fails as
        # the last attempt did is only counted.
        again = not fresh and before is not None and before[1] == _cause(exc)
        self._report(what, exc, "write" if fresh else "retry", log=not again)

    def _report(self, what: str, exc: Exception, op: str, *, log: bool = True) -> None:
        self.failures[what] = self.failures.get(what, 0) + 1
        if not log:
            return
        if isinstance(exc, OSError):
            # strerror only: the file name is in state_dir, and no content is ever logged
            reason, detail = STORAGE_UNAVAILABLE, exc.strerror or "OSError"
        else:
            reason, detail = INTERNAL_ERROR, exc.__class__.__name__
        self.events.emit(
            "state_write_failed",
            reason=reason,
            what=what,
            operation=op,
            errno=_cause(exc),
            detail=detail,
            state_dir=str(self.path),
        )

    # -- what the sidecar tells about it --

    @property
    def writable(self) -> bool:
        return not self.pending

    def describe(self) -> str | None:
        """One line for /readyz while writes are failing; None when all is saved."""
        if not self.pending:
            return None
        what = ", ".join(f"{k} ({err})" for k, (_, err) in sorted(self.pending.items()))
        return (
            f"degraded: {STORAGE_UNAVAILABLE}: cannot write {what} in {self.path}; "
            "serving with what is in memory, retrying"
        )
