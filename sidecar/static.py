"""Static identity: certificate, key, bundle and allow-list from files, reloaded when they change.

Files are polled (stat: inode, size, mtime) rather than watched, which also
works across the symlink swaps Kubernetes does for mounted Secrets. A change
is loaded and checked whole; anything wrong (a half-written file, a key that
does not match, an expired certificate) keeps what is in force and says why.
"""

from __future__ import annotations

import os
import tomllib
from datetime import datetime, timedelta
from pathlib import Path

from meshid.bundle import TrustBundle
from meshid.errors import ConfigError, InvalidSvid, MeshIdError
from meshid.policy import Policy
from meshid.spiffeid import SpiffeId, TrustDomain
from meshid.svid import certs_from_pem, key_from_pem
from sidecar.config import StaticSource, parse_policy_file
from sidecar.credentials import Svid

FileStamp = tuple[int, int, int] | None


def stamp(path: Path) -> FileStamp:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InvalidSvid(f"{what} {path}: {exc.strerror}", reason="unreadable") from None


def load_svid(
    source: StaticSource,
    identity: SpiffeId,
    trust_domain: TrustDomain,
    now: datetime,
    skew: timedelta,
) -> Svid:
    chain = certs_from_pem(_read(source.cert, "certificate"), f"certificate {source.cert}")
    key = key_from_pem(_read(source.key, "key"), None, f"key {source.key}")
    bundle = TrustBundle.from_pem(
        trust_domain, _read(source.bundle, "bundle"), what=f"bundle {source.bundle}"
    )
    return Svid.check(chain, key, bundle, identity, now, skew)


def load_policy(path: Path, trust_domain: TrustDomain, version: int) -> Policy:
    data = _read(path, "policy")
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"policy {path}: not valid TOML: {exc}") from None
    try:
        pairs = parse_policy_file(doc, trust_domain)
    except MeshIdError as exc:
        raise ConfigError(f"policy {path}: {exc.message}") from None
    return Policy.build(pairs, version)
