"""The certificate authority: its state directory and every action it takes.

This module is the façade: it creates (`init`) and opens (`open`) an authority;
the actions are its parts, each in its own module: ca.roots (the bundle, the
signing root, rollover), ca.issuance (issue, join tokens, enrollment, renewal),
ca.access (allow-list, revocations, the feed), ca.reports (what sidecars report),
on ca.authority_base (what an open authority holds) and ca.values.

State directory layout (created by `init`, never half-written):

    authority.db      SQLite: settings, roots, tokens, allow-list, revocations,
                      issued SVIDs, the audit chain
    keys/root-N.key   root private keys, mode 0600 in a 0700 directory,
                      optionally encrypted with a passphrase
    bundle.pem        the trust bundle, rewritten whenever it changes
    audit.key         the audit chain's MAC key, mode 0600 (see ca.store)
    audit.head        the audit chain's newest (seq, MAC), rewritten after each commit

`init` builds everything in a hidden sibling directory and moves it in with the
database last, so a directory either holds a whole authority or none.
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
from datetime import timedelta
from pathlib import Path

from ca.access import Access
from ca.attestors import Attestors
from ca.audit import AUDIT_HEAD, AUDIT_KEY
from ca.federation import Federations
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


class Authority(Federations, Attestors, Access, Services, Reports, Operators):
    """The whole authority: one object composed of its parts (see ca.authority_base)."""

    # -- lifecycle --

    @classmethod
    def open(cls, state_dir: Path, *, passphrase: bytes | None = None, clock: Clock) -> Authority:
        if not state_dir.is_dir():
            raise StateError(f"{state_dir}: no such directory (run 'meshid ca init')")
        store = Store.open(state_dir / DB_NAME, clock=clock)
        return cls(state_dir, store, passphrase=passphrase, clock=clock)

    @classmethod
    def init(
        cls,
        state_dir: Path,
        trust_domain: TrustDomain,
        *,
        svid_ttl: timedelta = DEFAULT_SVID_TTL,
        root_ttl: timedelta = DEFAULT_ROOT_TTL,
        passphrase: bytes | None = None,
        clock: Clock,
    ) -> Authority:
        check_svid_ttl(svid_ttl)
        if root_ttl <= svid_ttl:
            raise InvalidInput("the root lifetime must be longer than the SVID lifetime")
        if (state_dir / DB_NAME).exists():
            raise StateError(f"{state_dir}: already holds an authority; nothing was changed")
        if state_dir.exists() and not state_dir.is_dir():
            raise StateError(f"{state_dir}: exists and is not a directory")
        try:
            state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise StateError(f"{state_dir}: cannot create: {exc.strerror}") from None
        with _dir_lock(state_dir):
            if (state_dir / DB_NAME).exists():
                raise StateError(f"{state_dir}: already holds an authority; nothing was changed")
            staging = state_dir / f".init-{secrets.token_hex(4)}"
            try:
                staging.mkdir(mode=0o700)
                cls._build(staging, trust_domain, svid_ttl, root_ttl, passphrase, clock)
                keys = state_dir / "keys"
                if keys.exists():  # left by an init that died before its database landed
                    shutil.rmtree(keys)
                os.replace(staging / "keys", keys)
                os.replace(staging / BUNDLE_FILE, state_dir / BUNDLE_FILE)
                for name in (AUDIT_KEY, AUDIT_HEAD):
                    os.replace(staging / name, state_dir / name)
                os.replace(staging / DB_NAME, state_dir / DB_NAME)  # the commit point
            except OSError as exc:
                raise StateError(f"{state_dir}: cannot write: {exc.strerror}") from None
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        JwtKeyring(state_dir, clock.wall).keys()  # the first JWT-SVID key, so the bundle has one
        return cls.open(state_dir, passphrase=passphrase, clock=clock)

    @staticmethod
    def _build(
        staging: Path,
        trust_domain: TrustDomain,
        svid_ttl: timedelta,
        root_ttl: timedelta,
        passphrase: bytes | None,
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
        store = Store.open(staging / DB_NAME, create=True, clock=clock)
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
                    "created_at) VALUES (1, ?, 'keys/root-1.key', 'active', ?, ?)",
                    (certs_to_pem([root]).decode(), root.not_valid_after_utc.timestamp(), at),
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
                )
        finally:
            store.close()
