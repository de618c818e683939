"""The audit chain: keyed MAC links between audit rows, the key file and the head file.

Each audit row carries a MAC over the previous row's MAC and its own content
(seq, time, action, details): HMAC-SHA256 under a random 256-bit key kept in
``audit.key`` (mode 0600, in the state directory, never in the database).
After every transaction that adds rows, the newest (seq, MAC) is written to
``audit.head``, also outside the database. `verify_audit` recomputes the
chain and checks that the row named by the head is there with that MAC.

Against someone who can write the database but not those two files, this
detects: an edited row (its MAC, or the next row's link, breaks even when
every later MAC is recomputed, since that needs the key), a deleted or
reordered row (a gap or a broken link), and newest rows cut off (the head
names a row that is gone). It does not protect against someone who can also
read ``audit.key`` (they can rewrite the whole chain) or write ``audit.head``
(they can truncate to any earlier row); nor does it detect the loss of rows
written in the instant between a commit and the head update (the head is a
lower bound: crash-safe, never ahead of the database).

Several instances (PostgreSQL). Every instance extends the one chain, under
the one key: `meshid ca join --audit-key` copies it into the new instance's
state directory, so the key never enters the database. Each instance's
``audit.head`` names the newest row that instance wrote, or saw with a valid
MAC (its `ca serve` looks every few seconds: `Store.witness_audit`). Each
instance also leaves a *checkpoint* in the database, in the transaction that
adds its rows: (instance, seq, MAC) under a MAC of its own by the key
(`checkpoint_tag`), so that any instance can check how far every other
instance saw the chain. Verification on any instance's state directory then
checks the links and MACs, its own head record, and every instance's
checkpoint: each must be genuine, and name a row that is there with that MAC;
every instance in the `instances` table must have one.

Against someone who can write the database but not the instances' state
directories, this detects on every instance: an edited, deleted or reordered
row; rows cut off the end of the chain, when any instance wrote or witnessed a
row past the cut (its checkpoint, or its head record, names it); a forged or
edited checkpoint, and a deleted one. What one instance cannot see: newest
rows cut off together with their writer's checkpoint put back to an earlier
copy (a replayed genuine checkpoint), before that instance witnessed them;
the writer's own verification detects it, and so does every instance once its
`ca serve` has witnessed the newer row. Whoever holds the key (any
instance's state directory) can rewrite the whole chain.

Chains from before the key existed (schema version 2 and older) are kept:
their rows stay plain SHA-256 links and are verified so; the key file records
`keyed_from`, the first seq under the key, and the migration appends an
``audit_keyed`` row, so the old rows are then pinned by the first MAC'd link.
An existing key file is never replaced: rolling the database's schema version
back does not make the keyed rows unkeyed.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshid.errors import StateError, StorageUnavailable

GENESIS_HASH = "0" * 64
AUDIT_KEY = "audit.key"
AUDIT_HEAD = "audit.head"


def _row_body(prev_hash: str, seq: int, at: float, action: str, details: str) -> bytes:
    return json.dumps([prev_hash, seq, repr(at), action, details], separators=(",", ":")).encode()


def _row_hash(prev_hash: str, seq: int, at: float, action: str, details: str) -> str:
    """The link of a row from before the audit key: anyone can recompute it."""
    return hashlib.sha256(_row_body(prev_hash, seq, at, action, details)).hexdigest()


def _row_mac(key: bytes, prev: str, seq: int, at: float, action: str, details: str) -> str:
    """The link of a row under the audit key."""
    return hmac.new(key, _row_body(prev, seq, at, action, details), hashlib.sha256).hexdigest()


@dataclass(frozen=True, slots=True)
class AuditKey:
    key: bytes
    keyed_from: int  # the first seq linked by MAC; older rows are plain SHA-256

    @classmethod
    def load(cls, state_dir: Path) -> AuditKey | None:
        try:
            doc = json.loads((state_dir / AUDIT_KEY).read_text())
            key, keyed_from = bytes.fromhex(doc["key"]), int(doc["keyed_from"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise StateError(
                f"{state_dir / AUDIT_KEY}: unreadable audit key ({type(exc).__name__})",
                reason="audit_key_unreadable",
            ) from None
        if len(key) < 32 or keyed_from < 1:
            raise StateError(
                f"{state_dir / AUDIT_KEY}: not an audit key", reason="audit_key_unreadable"
            )
        return cls(key, keyed_from)

    @classmethod
    def create(cls, state_dir: Path, keyed_from: int) -> AuditKey:
        """A new key, written 0600 from the first byte; an existing key file wins."""
        made = cls(secrets.token_bytes(32), keyed_from)
        doc = json.dumps({"key": made.key.hex(), "keyed_from": keyed_from}).encode()
        try:
            fd = os.open(state_dir / AUDIT_KEY, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            existing = cls.load(state_dir)
            assert existing is not None
            return existing
        except OSError as exc:
            raise StorageUnavailable(f"cannot write the audit key: {exc.strerror}") from None
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(doc)
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as exc:
            (state_dir / AUDIT_KEY).unlink(missing_ok=True)
            raise StorageUnavailable(f"cannot write the audit key: {exc.strerror}") from None
        return made


def checkpoint_tag(key: bytes, instance: str, seq: int, mac: str) -> str:
    """An instance's checkpoint of the chain (its newest row), under the audit key."""
    body = json.dumps(["checkpoint", instance, seq, mac], separators=(",", ":")).encode()
    return hmac.new(key, body, hashlib.sha256).hexdigest()


def read_head(state_dir: Path) -> tuple[int, str] | None:
    """The newest (seq, MAC) recorded outside the database, if any."""
    try:
        doc = json.loads((state_dir / AUDIT_HEAD).read_text())
        return int(doc["seq"]), str(doc["mac"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return (-1, "")


@dataclass(frozen=True, slots=True)
class AuditEntry:
    seq: int
    at: float
    action: str
    details: dict[str, Any]
    prev_hash: str
    hash: str
