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
  errno name, counted, and the kind is marked pending. `retry` writes what is
  *current* for each pending kind, so a late retry never puts something older
  over something newer. With nothing pending the directory is writable again
  (``state_write_recovered``).
- ``svid.key`` holds the key and, after it, the chain it belongs to, so one
  rename commits the pair: whatever fails or crashes, a restart finds a key
  with its own certificate, the old pair or the new one, never a mix.
  ``svid.pem`` is a copy of the chain for tools; a restart prefers the chain in
  the key file. The bundle goes first: it is written before a certificate
  that may need its new root.
- Every file is staged beside its target and renamed over it
  (`meshid.files.write_atomic`); staging files a crash left behind are removed
  at start, so repeated crashes cannot fill the disk.
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
STORAGE_UNAVAILABLE = StorageUnavailable.reason


def errno_name(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, "EIO")


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
        self._failed = trio.Event()

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

    def read_feed(self) -> dict[str, Any]:
        doc = json.loads(self.file(FEED_FILE).read_text())
        if not isinstance(doc, dict):
            raise TypeError("feed.json is not an object")
        return doc

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

    def save(self, what: str, write: Callable[[], None], op: str = "write") -> bool:
        """Run `write` (which writes what is current for `what`); never raises OSError.

        On failure the kind stays pending and `retry` calls `write` again later.
        """
        try:
            write()
        except OSError as exc:
            self._failed_write(what, write, exc, op)
            return False
        if self.pending.pop(what, None) is not None:
            self.events.emit("state_write_recovered", what=what, state_dir=str(self.path))
        return True

    def retry(self) -> None:
        """Write once more what is current for every pending kind."""
        for what, (write, _) in list(self.pending.items()):
            self.save(what, write, "retry")

    def _failed_write(self, what: str, write: Callable[[], None], exc: OSError, op: str) -> None:
        before = self.pending.get(what)
        self.pending[what] = (write, errno_name(exc))
        # A retry that fails as the last attempt did is counted but not logged again.
        self._report(
            what, exc, op, log=op != "retry" or before is None or before[1] != errno_name(exc)
        )
        self._failed.set()

    def _report(self, what: str, exc: OSError, op: str, *, log: bool = True) -> None:
        self.failures[what] = self.failures.get(what, 0) + 1
        if log:
            self.events.emit(
                "state_write_failed",
                reason=STORAGE_UNAVAILABLE,
                what=what,
                operation=op,
                errno=errno_name(exc),
                detail=exc.strerror or exc.__class__.__name__,
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

    async def wait_failed(self) -> None:
        """Return once something is pending (at once if something already is)."""
        while not self.pending:
            await self._failed.wait()
            self._failed = trio.Event()
