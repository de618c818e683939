"""This instance's JWT-SVID signing keys: created, rotated, published, never shown.

On a trust domain of several instances, each signs with keys of its own; their
public halves meet in the database (`ca.instances.publish_jwt_keys`).

Each key is one PEM file (PKCS#8, mode 0600) under ``<state>/jwt/``, named
``<created>-<kid>.pem``; the `kid` is the key's RFC 7638 thumbprint. The
newest key signs. Rotation adds a key; the one it replaces stays in the
bundle (so tokens it signed still validate, and validators that fetched the
bundle before the rotation still know the new key once they refresh) until
the new key is older than `retire_after`, then its file is removed.

The first key is created on first use, under an exclusive lock on the
directory so that two processes starting at once agree on one key. Keys are
P-256 (ES256), the JWT-SVID default.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from meshid.errors import StateError
from meshid.files import write_private
from meshid.jwtsvid import key_id, public_jwk

DIRECTORY = "jwt"
ROTATE_AFTER = timedelta(days=30)
RETIRE_AFTER = timedelta(days=1)  # far beyond the longest JWT-SVID and any bundle refresh


@dataclass(frozen=True, slots=True)
class JwtKey:
    kid: str
    created: datetime
    key: ec.EllipticCurvePrivateKey
    path: Path


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class JwtKeyring:
    def __init__(
        self,
        state_dir: Path,
        clock: Callable[[], datetime],
        *,
        rotate_after: timedelta = ROTATE_AFTER,
        retire_after: timedelta = RETIRE_AFTER,
    ) -> None:
        self.directory = state_dir / DIRECTORY
        self.clock = clock
        self.rotate_after = rotate_after
        self.retire_after = retire_after
        self._lock = threading.Lock()
        self._keys: list[JwtKey] = []
        self._mtime = -1

    def _load(self) -> list[JwtKey]:
        keys: list[JwtKey] = []
        for path in sorted(self.directory.glob("*.pem")):
            stamp, _, kid = path.stem.partition("-")
            try:
                key = serialization.load_pem_private_key(path.read_bytes(), password=None)
                created = datetime.fromtimestamp(int(stamp), tz=self.clock().tzinfo)
            except (OSError, ValueError) as exc:
                raise StateError(f"JWT key {path.name} cannot be read: {exc}") from None
            if not isinstance(key, ec.EllipticCurvePrivateKey) or key_id(key.public_key()) != kid:
                raise StateError(f"JWT key {path.name} is not the key its name says")
            keys.append(JwtKey(kid, created, key, path))
        keys.sort(key=lambda k: k.created)
        return keys

    def _create(self, now: datetime) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        kid = key_id(key.public_key())
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        write_private(self.directory / f"{int(now.timestamp())}-{kid}.pem", pem)

    def _refresh(self, *, rotate: bool = False) -> list[JwtKey]:
        """Load; create the first key, rotate when due (or asked), retire old ones."""
        now = self.clock()
        try:
            self.directory.mkdir(mode=0o700, exist_ok=True)
            with _locked(self.directory):
                keys = self._load()
                if not keys or rotate or now - keys[-1].created >= self.rotate_after:
                    self._create(now)
                    keys = self._load()
                newest = keys[-1]
                if now - newest.created >= self.retire_after:
                    for old in keys[:-1]:
                        old.path.unlink(missing_ok=True)
                    keys = [newest]
        except OSError as exc:
            raise StateError(f"JWT keys in {self.directory}: {exc.strerror}") from None
        return keys

    def _changed_on_disk(self) -> bool:
        """Another process (or instance) rotated: the directory's mtime moved."""
        try:
            mtime = self.directory.stat().st_mtime_ns
        except OSError:
            return True
        if mtime != self._mtime:
            self._mtime = mtime
            return True
        return False

    def keys(self) -> list[JwtKey]:
        with self._lock:
            if self._changed_on_disk():
                self._keys = []
            newest = self._keys[-1] if self._keys else None
            due = newest is None or self.clock() - newest.created >= self.rotate_after
            stale_old = (
                newest is not None
                and len(self._keys) > 1
                and self.clock() - newest.created >= self.retire_after
            )
            if due or stale_old:
                self._keys = self._refresh()
                self._changed_on_disk()  # our own write is not news
            return list(self._keys)

    def rotate(self) -> JwtKey:
        with self._lock:
            self._keys = self._refresh(rotate=True)
            self._changed_on_disk()
            return self._keys[-1]

    def signing_key(self) -> JwtKey:
        return self.keys()[-1]

    def bundle_entries(self) -> list[dict[str, Any]]:
        """The `use: jwt-svid` entries for the SPIFFE bundle, oldest first."""
        return [public_jwk(k.key.public_key(), k.kid) for k in self.keys()]


def with_jwt_keys(
    doc: dict[str, Any], keyring: JwtKeyring, shared: Sequence[dict[str, Any]] = ()
) -> dict[str, Any]:
    """A SPIFFE bundle document with the JWT authorities added to its keys: this
    instance's, then those `shared` by the other instances of the trust domain."""
    own = keyring.bundle_entries()
    kids = {e["kid"] for e in own}
    others = [e for e in shared if e.get("kid") not in kids]
    return {**doc, "keys": [*doc.get("keys", []), *own, *others]}
