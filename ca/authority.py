"""The certificate authority: its state directory and every action it takes.

This module is the façade: it creates (`init`) and opens (`open`) an authority;
the actions are its parts, each in its own module: ca.roots (the bundle, the
signing root, rollover), ca.issuance (issue, join tokens, enrollment, renewal),
ca.access (allow-list, revocations, the feed), ca.reports (what sidecars report),
on ca.authority_base (what an open authority holds) and ca.values.

State directory layout (created by `init`, never half-written):

    authority.db      SQLite: settings, roots, tokens, allow-list, revocations,
                      issued SVIDs, the audit chain
    database.json     in its place, for an instance of a trust domain in PostgreSQL:
                      the URL and the instance's name (ca.backend); never a password
    keys/root-N.key   root private keys, mode 0600 in a 0700 directory,
                      optionally encrypted with a passphrase
    bundle.pem        the trust bundle, rewritten whenever it changes
    audit.key         the audit chain's MAC key, mode 0600 (see ca.store)
    audit.head        the audit chain's newest (seq, MAC), rewritten after each commit

`init` (and `join`, for another instance) builds everything in a hidden sibling
directory and moves it in with the database (or database.json) last, so a
directory either holds a whole authority or none. With PostgreSQL the rows are
committed first: a directory that failed to land after them leaves a trust
domain (or an instance) in the database that `init` (or `join` under the same
name) refuses; drop it, or join under another name.
Actions that change state run in one database transaction together with
their audit row. The root key is read only by the actions that sign. Every
root generation is protected like the first: on an encrypted authority a new
root key is written only under the passphrase the active key opens with, and
a plaintext key is neither written nor activated.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from ca import backend
from ca.access import Access
from ca.attestors import Attestors
from ca.audit import AUDIT_HEAD, AUDIT_KEY, AuditKey
from ca.backend import Database
from ca.db import Conflict, Engine
from ca.federation import Federations
from ca.instances import Instances
from ca.jwtkeys import JwtKeyring
from ca.operators import Operators
from ca.reports import Reports
from ca.schema import SCHEMA_VERSION
from ca.services import Services
from ca.store import DB_NAME, Store
from ca.values import (
    BUNDLE_FILE,
    DEFAULT_ROOT_TTL,
    DEFAULT_SVID_TTL,
    IssuedSvid,
    Prepared,
    _dir_lock,
    _write_private,
    check_svid_ttl,
    printable,
    propagation_default,
)
from meshid.clock import Clock
from meshid.errors import (
    InvalidInput,
    StateError,
)
from meshid.spiffeid import TrustDomain
from meshid.svid import (
    build_root,
    certs_to_pem,
    generate_key,
    key_to_pem,
)

__all__ = ["Authority", "IssuedSvid", "Prepared"]  # the façade, as ca.api imports it


class Authority(Federations, Attestors, Access, Services, Reports, Operators, Instances):
    """The whole authority: one object composed of its parts (see ca.authority_base)."""

    # -- lifecycle --

    @classmethod
    def open(cls, state_dir: Path, *, passphrase: bytes | None = None, clock: Clock) -> Authority:
        if not state_dir.is_dir():
            raise StateError(f"{state_dir}: no such directory (run 'meshid ca init')")
        database = backend.load(state_dir)
        if database is None:
            store = Store.open(state_dir / DB_NAME, clock=clock)
            return cls(state_dir, store, passphrase=passphrase, clock=clock)
        store = Store.attach(_pg_engine(database), state_dir, False, clock)
        store.instance = database.instance
        return cls(state_dir, store, passphrase=passphrase, clock=clock, instance=database.instance)

    @classmethod
    def init(
        cls,
        state_dir: Path,
        trust_domain: TrustDomain,
        *,
        svid_ttl: timedelta = DEFAULT_SVID_TTL,
        root_ttl: timedelta = DEFAULT_ROOT_TTL,
        passphrase: bytes | None = None,
        database: Database | None = None,
        clock: Clock,
    ) -> Authority:
        """A new trust domain: in SQLite in `state_dir`, or in `database` with this
        host's instance in `state_dir`."""
        check_svid_ttl(svid_ttl)
        if root_ttl <= svid_ttl:
            raise InvalidInput("the root lifetime must be longer than the SVID lifetime")

        def build(staging: Path) -> None:
            cls._build(staging, trust_domain, svid_ttl, root_ttl, passphrase, database, clock)

        cls._create_state(state_dir, build, database)
        # the first JWT-SVID key, so the bundle has one
        keys = JwtKeyring(state_dir, clock.wall).bundle_entries()
        made = cls.open(state_dir, passphrase=passphrase, clock=clock)
        made.publish_jwt_keys(keys)
        return made

    @classmethod
    def join(
        cls,
        state_dir: Path,
        database: Database,
        *,
        audit_key: Path,
        propagation: timedelta | None = None,
        passphrase: bytes | None = None,
        clock: Clock,
    ) -> Authority:
        """Add this host's instance to the trust domain in `database`.

        The instance's root is published in the bundle now and signs only once
        it passes the rollover gate (`propagation`, then every live sidecar
        holding it), exactly as a rotated root does. Its key stays in
        `state_dir`. The audit chain's key (`audit_key`, a copy of another
        instance's `audit.key`) is shared, so any instance verifies the chain.
        """

        def build(staging: Path) -> None:
            cls._build_instance(staging, database, audit_key, propagation, passphrase, clock)

        cls._create_state(state_dir, build, database)
        keys = JwtKeyring(state_dir, clock.wall).bundle_entries()
        joined = cls.open(state_dir, passphrase=passphrase, clock=clock)
        joined.publish_jwt_keys(keys)  # served by every instance before it signs
        joined.write_bundle_file()
        return joined

    @staticmethod
    def _create_state(
        state_dir: Path, build: Callable[[Path], None], database: Database | None
    ) -> None:
        """Build a state directory in a hidden sibling and move it in, its database last."""
        if _holds_authority(state_dir):
            raise StateError(f"{state_dir}: already holds an authority; nothing was changed")
        if state_dir.exists() and not state_dir.is_dir():
            raise StateError(f"{state_dir}: exists and is not a directory")
        try:
            state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise StateError(f"{state_dir}: cannot create: {exc.strerror}") from None
        with _dir_lock(state_dir):
            if _holds_authority(state_dir):
                raise StateError(f"{state_dir}: already holds an authority; nothing was changed")
            staging = state_dir / f".init-{secrets.token_hex(4)}"
            try:
                staging.mkdir(mode=0o700)
                build(staging)
                if database is not None:
                    backend.save(staging, database)
                keys = state_dir / "keys"
                if keys.exists():  # left by an init that died before its database landed
                    shutil.rmtree(keys)
                os.replace(staging / "keys", keys)
                for name in (BUNDLE_FILE, AUDIT_KEY, AUDIT_HEAD):
                    if (staging / name).exists():
                        os.replace(staging / name, state_dir / name)
                last = DB_NAME if database is None else backend.DATABASE_FILE
                os.replace(staging / last, state_dir / last)  # the commit point
            except OSError as exc:
                raise StateError(f"{state_dir}: cannot write: {exc.strerror}") from None
            finally:
                shutil.rmtree(staging, ignore_errors=True)

    @staticmethod
    def _build(
        staging: Path,
        trust_domain: TrustDomain,
        svid_ttl: timedelta,
        root_ttl: timedelta,
        passphrase: bytes | None,
        database: Database | None,
        clock: Clock,
    ) -> None:
        now = clock.wall()
        key = generate_key()
        root = build_root(
            trust_domain, key, not_before=now - timedelta(minutes=5), not_after=now + root_ttl
        )
        (staging / "keys").mkdir(mode=0o700)
        _write_private(staging / "keys" / "root-1.key", key_to_pem(key, passphrase))
        (staging / BUNDLE_FILE).write_bytes(certs_to_pem([root]))
        if database is None:
            store = Store.open(staging / DB_NAME, create=True, clock=clock)
        else:
            store = _empty_pg_store(database, staging, clock)
        instance = "" if database is None else database.instance
        store.instance = instance
        try:
            at = now.timestamp()
            with store.write() as conn:
                settings = {
                    "schema_version": str(SCHEMA_VERSION),
                    "trust_domain": trust_domain.name,
                    "svid_ttl": str(int(svid_ttl.total_seconds())),
                    "root_ttl": str(int(root_ttl.total_seconds())),
                    "key_encrypted": "1" if passphrase else "0",
                }
                conn.executemany("INSERT INTO settings VALUES (?, ?)", settings.items())
                conn.executemany(
                    "INSERT INTO counters VALUES (?, ?)",
                    [("policy_version", 0), ("revocation_version", 0), ("bundle_sequence", 1)],
                )
                conn.execute(
                    "INSERT INTO roots (generation, cert_pem, key_file, state, not_after, "
                    "created_at, instance) VALUES (1, ?, 'keys/root-1.key', 'active', ?, ?, ?)",
                    (
                        certs_to_pem([root]).decode(),
                        root.not_valid_after_utc.timestamp(),
                        at,
                        instance,
                    ),
                )
                if database is not None:
                    conn.execute(
                        "INSERT INTO instances (name, created_at) VALUES (?, ?)", (instance, at)
                    )
                store.audit(
                    conn,
                    at,
                    "init",
                    trust_domain=trust_domain.name,
                    svid_ttl=int(svid_ttl.total_seconds()),
                    root_serial=f"{root.serial_number:x}",
                    root_not_after=root.not_valid_after_utc.isoformat(),
                    key_encrypted=bool(passphrase),
                    **({"instance": instance} if instance else {}),
                )
        finally:
            store.close()

    @staticmethod
    def _build_instance(
        staging: Path,
        database: Database,
        audit_key: Path,
        propagation: timedelta | None,
        passphrase: bytes | None,
        clock: Clock,
    ) -> None:
        """A joining instance's state: its root key, the shared audit key, its rows."""
        try:
            key_bytes = audit_key.read_bytes()
        except OSError as exc:
            raise StateError(f"{audit_key}: cannot read the audit key: {exc.strerror}") from None
        _write_private(staging / AUDIT_KEY, key_bytes)
        if AuditKey.load(staging) is None:  # pragma: no cover - load raises on a bad key
            raise StateError(f"{audit_key}: not an audit key")
        store = Store.attach(_pg_engine(database), staging, False, clock)
        store.instance = database.instance
        try:
            with store.read() as conn:
                trust_domain = TrustDomain(Store.setting(conn, "trust_domain"))
                root_ttl = timedelta(seconds=int(Store.setting(conn, "root_ttl")))
                svid_ttl = timedelta(seconds=int(Store.setting(conn, "svid_ttl")))
                encrypted = Store.setting(conn, "key_encrypted") == "1"
                last = conn.execute("SELECT MAX(generation) FROM roots").fetchone()
            if encrypted and passphrase is None:
                raise StateError(
                    "this trust domain's root keys are encrypted: give the new instance's "
                    "passphrase with --passphrase-file or MESHID_CA_PASSPHRASE",
                    reason="passphrase_required",
                )
            now = clock.wall()
            generation = int(last[0] or 0) + 1
            key = generate_key()
            root = build_root(
                trust_domain,
                key,
                not_before=now - timedelta(minutes=5),
                not_after=now + root_ttl,
                generation=generation,
            )
            key_file = f"keys/root-{generation}.key"
            (staging / "keys").mkdir(mode=0o700)
            _write_private(staging / key_file, key_to_pem(key, passphrase if encrypted else None))
            at = now.timestamp()
            activate_at = now + (
                propagation_default(svid_ttl) if propagation is None else propagation
            )
            try:
                with store.write() as conn:
                    conn.execute(
                        "INSERT INTO instances (name, created_at) VALUES (?, ?)",
                        (database.instance, at),
                    )
                    sequence = Store.bump(conn, "bundle_sequence")
                    conn.execute(
                        "INSERT INTO roots (generation, cert_pem, key_file, state, not_after, "
                        "created_at, activate_at, published_sequence, wait_for_acks, instance) "
                        "VALUES (?, ?, ?, 'next', ?, ?, ?, ?, 1, ?)",
                        (
                            generation,
                            certs_to_pem([root]).decode(),
                            key_file,
                            root.not_valid_after_utc.timestamp(),
                            at,
                            activate_at.timestamp(),
                            sequence,
                            database.instance,
                        ),
                    )
                    store.audit(
                        conn,
                        at,
                        "instance_joined",
                        instance=database.instance,
                        generation=generation,
                        root_serial=f"{root.serial_number:x}",
                        activate_at=activate_at.isoformat(),
                        bundle_sequence=sequence,
                    )
            except Conflict:
                raise StateError(
                    f"instance {database.instance!r} is already in this trust domain, or "
                    "another instance published a root at the same moment; nothing was changed",
                ) from None
        finally:
            store.close()


def _holds_authority(state_dir: Path) -> bool:
    return (state_dir / DB_NAME).exists() or (state_dir / backend.DATABASE_FILE).exists()


def _pg_engine(database: Database) -> Engine:
    from ca.pgengine import PgEngine  # the driver only where a database is named

    return PgEngine.open(database.url, database.password)


def _empty_pg_store(database: Database, staging: Path, clock: Clock) -> Store:
    """The schema in a database that holds no trust domain yet (or refused, if it does)."""
    engine = _pg_engine(database)
    try:
        existing = _pg_trust_domain(engine)
    except BaseException:
        engine.close()
        raise
    if existing is not None:
        engine.close()
        raise StateError(
            f"the database already holds trust domain {printable(existing)}: "
            "add an instance with 'meshid ca join'; nothing was changed"
        )
    return Store.attach(engine, staging, True, clock)


def _pg_trust_domain(engine: Engine) -> str | None:
    """The trust domain a database already holds, if any (an empty schema holds none)."""
    holds = engine.conn.execute(
        "SELECT 1 FROM information_schema.tables WHERE table_schema = current_schema() "
        "AND table_name = 'settings'"
    ).fetchone()
    if holds is None:
        return None
    row = engine.conn.execute("SELECT value FROM settings WHERE name = 'trust_domain'").fetchone()
    return None if row is None else str(row[0])
