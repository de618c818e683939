"""Roots and their rollover: the bundle, the signing root and its key, rotation.

Theory of operation: a rotation publishes a `next` root in the bundle at once and
lets it sign only after the propagation delay and, unless released, once every
live sidecar reported holding that bundle. `advance_roots` runs on the signing
path (at most once a second) and moves `next` to `active`, the old active root to
`retiring`, and a retiring root whose last SVID expired to `retired`. A root key
is read only to sign and is held to the protection of the first key.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509

from ca.db import Conflict, Connection
from ca.rootlife import PendingRoot
from ca.rootviews import RootViews
from ca.store import Store
from ca.values import (
    _PEM_HEAD,
    BUNDLE_FILE,
    BUNDLE_RECHECK,
    SIGNER_RECHECK,
    _is_encrypted,
    _write_private,
)
from meshid.bundle import TrustBundle
from meshid.errors import (
    InvalidSvid,
    PolicyError,
    StateError,
    StorageUnavailable,
)
from meshid.files import write_atomic
from meshid.svid import (
    PrivateKey,
    build_root,
    certs_from_pem,
    certs_to_pem,
    generate_key,
    key_from_pem,
    key_to_pem,
)


class Roots(RootViews):
    # -- roots and the bundle --

    def bundle(self) -> TrustBundle:
        """The published roots; parsed again only when the sequence moves.

        Outside a transaction, the sequence itself is looked at again at most
        every BUNDLE_RECHECK seconds: a busy control plane asks for it several
        times per signature, and roots change on a scale of minutes.
        """
        now = self._clock.monotonic()
        if (
            self._bundle_cache is not None
            and not self.store.in_transaction
            and now - self._bundle_checked < BUNDLE_RECHECK
        ):
            return self._bundle_cache
        self._bundle_checked = now
        with self.store.read() as conn:
            sequence = Store.counter(conn, "bundle_sequence")
            if self._bundle_cache is not None and self._bundle_cache.sequence == sequence:
                return self._bundle_cache
            rows = conn.execute(
                "SELECT cert_pem FROM roots WHERE state IN ('next', 'active', 'retiring') "
                "ORDER BY generation"
            ).fetchall()
        roots = [c for (pem,) in rows for c in certs_from_pem(pem.encode(), "root")]
        self._bundle_cache = TrustBundle(self.trust_domain, tuple(roots), sequence)
        return self._bundle_cache

    def signer(self) -> tuple[int, x509.Certificate, PrivateKey]:
        """The active root and its key; the key file is read on first use.

        The roots are looked at again at most once a second of the authority's
        clock: a root changes state on a schedule of minutes, and a busy
        control plane signs hundreds of SVIDs a second.
        """
        now = self._now()
        if (
            self._signer_cache is not None
            and self._signer_checked is not None
            and self._signer_checked <= now < self._signer_checked + SIGNER_RECHECK
        ):
            return self._signer_cache
        self.advance_roots()
        self._signer_checked = now
        with self.store.read() as conn:
            row = conn.execute(
                "SELECT generation, cert_pem, key_file FROM roots "
                "WHERE state = 'active' AND instance = ?",
                (self.instance,),
            ).fetchone()
        if row is None:
            raise self._no_active_root()
        generation, cert_pem, key_file = int(row[0]), str(row[1]), str(row[2])
        if self._signer_cache is not None and self._signer_cache[0] == generation:
            return self._signer_cache
        cert = certs_from_pem(cert_pem.encode(), "root")[0]
        key = self._load_key(self.state_dir / key_file)
        self._signer_cache = (generation, cert, key)
        return self._signer_cache

    def own_root_pending(self) -> PendingRoot | None:
        """This instance's first root, while it waits for the rollover gate (else None).

        Moves it to active when its time has come, as the signing path would.
        """
        self.advance_roots()
        with self.store.read() as conn:
            active = conn.execute(
                "SELECT 1 FROM roots WHERE state = 'active' AND instance = ?", (self.instance,)
            ).fetchone()
        return None if active is not None else self.pending_root()

    def _load_key(self, path: Path) -> PrivateKey:
        """One root key, held to the protection the authority's first key set.

        The file itself says whether it is encrypted; on an authority whose
        keys are encrypted, a plaintext one (written by hand, or by a rotation
        of an older version) is refused rather than signed with.
        """
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise StateError(f"cannot read root key {path}: {exc.strerror}") from None
        encrypted = _is_encrypted(data)
        if self.key_encrypted and not encrypted:
            raise StateError(
                f"root key {path.name} is not encrypted though this authority's keys are; "
                "encrypt it with the passphrase before it signs",
                reason="key_unprotected",
            )
        if encrypted and self._passphrase is None:
            raise StateError(
                "the root key is encrypted: give its passphrase with --passphrase-file "
                "or MESHID_CA_PASSPHRASE",
                reason="passphrase_required",
            )
        try:
            return key_from_pem(data, self._passphrase if encrypted else None, "root key")
        except InvalidSvid as exc:
            raise StateError(exc.message, reason=exc.reason) from None

    def _key_problem(self, conn: Connection, generation: int) -> str | None:
        """Why root `generation`'s key could not sign, as far as can be told without
        decrypting it: missing, unreadable, or less protected than the authority's keys."""
        row = conn.execute(
            "SELECT key_file FROM roots WHERE generation = ?", (generation,)
        ).fetchone()
        if row is None:
            return f"root {generation} is not in the database"
        path = self.state_dir / str(row[0])
        try:
            with open(path, "rb") as handle:
                head = handle.read(_PEM_HEAD)
        except OSError as exc:
            return f"cannot read root key {path.name}: {exc.strerror}"
        if self.key_encrypted and not _is_encrypted(head):
            return f"root key {path.name} is not encrypted though this authority's keys are"
        return None

    def next_root_problem(self) -> str | None:
        """Why a root waiting to activate could not take over, if its key is unusable."""
        with self.store.read() as conn:
            row = conn.execute(
                "SELECT generation FROM roots WHERE state = 'next' AND instance = ?",
                (self.instance,),
            ).fetchone()
            return None if row is None else self._key_problem(conn, int(row[0]))

    def _new_key_protection(self, conn: Connection) -> bytes | None:
        """The passphrase a new root key is written under: the one the active key opens with.

        A new key is never less protected than the existing ones: on an
        encrypted authority a missing or wrong passphrase refuses the action
        before any file is written.
        """
        if not self.key_encrypted:
            return None
        row = conn.execute(
            "SELECT key_file FROM roots WHERE state = 'active' AND instance = ?", (self.instance,)
        ).fetchone()
        if row is None:
            raise self._no_active_root()
        self._load_key(self.state_dir / str(row[0]))  # proves the passphrase, or refuses
        return self._passphrase

    # -- root rollover --

    def rotate(self, propagation: timedelta, *, wait_for_acks: bool = True) -> tuple[int, datetime]:
        """Publish a next root now; it starts signing after `propagation`.

        Sidecars learn the new root from the bundle feed before any SVID it
        signs exists, so no peer ever sees a certificate it cannot verify.
        """
        now = self._now()
        with self.store.read() as conn:
            pending = conn.execute(
                "SELECT generation FROM roots WHERE state = 'next' AND instance = ?",
                (self.instance,),
            ).fetchone()
            root_ttl = timedelta(seconds=int(Store.setting(conn, "root_ttl")))
            last = conn.execute("SELECT MAX(generation) FROM roots").fetchone()
            protection = self._new_key_protection(conn)
        if pending is not None:
            raise PolicyError(
                f"root {pending[0]} is already waiting to take over; a rollover is in progress",
                reason="rotation_in_progress",
            )
        generation = int(last[0]) + 1
        key = generate_key()
        root = build_root(
            self.trust_domain,
            key,
            not_before=now - timedelta(minutes=5),
            not_after=now + root_ttl,
            generation=generation,
        )
        key_file = f"keys/root-{generation}.key"
        path = self.state_dir / key_file
        try:
            path.unlink(missing_ok=True)  # an orphan of a rotation whose commit failed
            _write_private(path, key_to_pem(key, protection))
        except OSError as exc:
            path.unlink(missing_ok=True)
            raise StorageUnavailable(f"cannot write root key {key_file}: {exc.strerror}") from None
        activate_at = now + propagation
        try:
            self._publish_root(generation, root, key_file, now, activate_at, wait_for_acks)
        except BaseException:
            path.unlink(missing_ok=True)  # the database does not know this key: drop it
            raise
        self._signer_checked = None  # a zero propagation delay takes effect at once
        self._bundle_checked = -math.inf
        self.write_bundle_file()
        return generation, activate_at

    def _publish_root(
        self,
        generation: int,
        root: x509.Certificate,
        key_file: str,
        now: datetime,
        activate_at: datetime,
        wait_for_acks: bool,
    ) -> None:
        with self.store.write() as conn:
            sequence = Store.bump(conn, "bundle_sequence")
            self._insert_root(
                conn,
                "INSERT INTO roots (generation, cert_pem, key_file, state, not_after, created_at, "
                "activate_at, published_sequence, wait_for_acks, instance) "
                "VALUES (?, ?, ?, 'next', ?, ?, ?, ?, ?, ?)",
                (
                    generation,
                    certs_to_pem([root]).decode(),
                    key_file,
                    root.not_valid_after_utc.timestamp(),
                    now.timestamp(),
                    activate_at.timestamp(),
                    sequence,
                    1 if wait_for_acks else 0,
                    self.instance,
                ),
            )
            self.store.audit(
                conn,
                now.timestamp(),
                "root_published",
                generation=generation,
                root_serial=f"{root.serial_number:x}",
                activate_at=activate_at.isoformat(),
                bundle_sequence=sequence,
            )

    @staticmethod
    def _insert_root(conn: Connection, sql: str, params: tuple[object, ...]) -> None:
        try:
            conn.execute(sql, params)
        except Conflict:
            raise StateError(
                f"another instance published root {params[0]} at the same moment; "
                "nothing was changed, try again"
            ) from None

    def advance_roots(self) -> bool:
        """Activate a next root whose time has come; retire roots whose last SVID expired.

        Returns True when the bundle changed. Cheap when there is nothing to do.
        """
        now = self._now().timestamp()
        with self.store.read() as conn:
            due = conn.execute(
                "SELECT generation, published_sequence, wait_for_acks FROM roots "
                "WHERE state = 'next' AND instance = ? AND activate_at <= ?",
                (self.instance, now),
            ).fetchone()
            if due is not None and due[2] and self._lagging(conn, int(due[1] or 0), now):
                due = None  # a live sidecar has not confirmed the new bundle yet
            if due is not None and self._key_problem(conn, int(due[0])) is not None:
                due = None  # the old root keeps signing; `meshid ca status` says why
            retiring = conn.execute(
                "SELECT r.generation FROM roots r WHERE r.state = 'retiring' AND "
                "COALESCE((SELECT MAX(not_after) FROM svids s WHERE s.generation = r.generation),"
                " 0) <= ?",
                (now,),
            ).fetchall()
        if due is None and not retiring:
            return False
        self._signer_checked = None  # the active root may change here
        self._bundle_checked = -math.inf
        changed = False
        with self.store.write() as conn:
            if due is not None:
                old = conn.execute(
                    "SELECT generation FROM roots WHERE state = 'active' AND instance = ?",
                    (self.instance,),
                ).fetchone()
                conn.execute(
                    "UPDATE roots SET state = 'retiring' WHERE state = 'active' AND instance = ?",
                    (self.instance,),
                )
                updated = conn.execute(
                    "UPDATE roots SET state = 'active' WHERE generation = ? AND state = 'next'",
                    (due[0],),
                ).rowcount
                if updated:
                    self.store.audit(
                        conn,
                        now,
                        "root_activated",
                        generation=int(due[0]),
                        previous=int(old[0]) if old else None,
                    )
            for (generation,) in retiring:
                updated = conn.execute(
                    "UPDATE roots SET state = 'retired' WHERE generation = ? "
                    "AND state = 'retiring' AND COALESCE("
                    "(SELECT MAX(not_after) FROM svids WHERE generation = ?), 0) <= ?",
                    (generation, generation, now),
                ).rowcount
                if updated:
                    sequence = Store.bump(conn, "bundle_sequence")
                    self.store.audit(
                        conn, now, "root_retired", generation=generation, bundle_sequence=sequence
                    )
                    changed = True
        if changed:
            self.write_bundle_file()
        return changed

    def rotate_unless_pending(
        self, propagation: timedelta, *, wait_for_acks: bool
    ) -> tuple[int, datetime] | None:
        """`rotate`, unless a next root is already published (then None).

        Several server workers may decide to rotate in the same second: under
        `rotation_lock` one of them does it and the others see it done.
        """
        with self.rotation_lock():
            with self.store.read() as conn:
                pending = conn.execute(
                    "SELECT 1 FROM roots WHERE state = 'next' AND instance = ?", (self.instance,)
                ).fetchone()
            if pending is not None:
                return None
            return self.rotate(propagation, wait_for_acks=wait_for_acks)

    @contextmanager
    def rotation_lock(self) -> Iterator[None]:
        """Held around `rotate`: two rotations at once would pick the same generation
        and one would overwrite the other's key file."""
        with open(self.state_dir / ".rotate.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def release_next_root(self, reason: str) -> int | None:
        """Let the waiting root activate now, whether or not every sidecar confirmed it.

        For when the active root is about to expire: past that, no SVID it
        signed verifies anywhere, so waiting for a laggard helps nobody.
        """
        now = self._now().timestamp()
        with self.store.write() as conn:
            row = conn.execute(
                "SELECT generation FROM roots WHERE state = 'next' AND instance = ?",
                (self.instance,),
            ).fetchone()
            if row is None:
                return None
            conn.execute(
                "UPDATE roots SET wait_for_acks = 0, activate_at = CASE "
                "WHEN activate_at IS NULL OR activate_at > ? THEN ? ELSE activate_at END "
                "WHERE state = 'next' AND instance = ?",
                (now, now, self.instance),
            )
            self.store.audit(conn, now, "root_released", generation=int(row[0]), reason=reason)
        self._signer_checked = None
        return int(row[0])

    def write_bundle_file(self) -> None:
        with contextlib.suppress(OSError):
            write_atomic(self.state_dir / BUNDLE_FILE, self.bundle().to_pem())
