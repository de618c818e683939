"""Static identity: certificate, key, bundle and allow-list from files, reloaded when they change.

Files are polled (stat: inode, size, mtime) rather than watched, which also
works across the symlink swaps Kubernetes does for mounted Secrets. A change
is loaded and checked whole; anything wrong (a half-written file, a key that
does not match, an expired certificate) keeps what is in force and says why.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

import trio

from meshid.bundle import TrustBundle
from meshid.errors import ConfigError, InvalidSvid, MeshIdError
from meshid.policy import Policy
from meshid.spiffeid import SpiffeId, TrustDomain
from meshid.svid import certs_from_pem, key_from_pem
from sidecar.config import StaticSource, parse_policy_file
from sidecar.credentials import Svid
from sidecar.events import EventLog
from sidecar.state import Current

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


class StaticIdentity:
    """The static source: loads the files at start, then polls them every `interval` seconds."""

    def __init__(
        self,
        source: StaticSource,
        current: Current,
        events: EventLog,
        *,
        install_svid: Callable[[Svid, str], None],
        install_policy: Callable[[Policy], int],
        count_renewal: Callable[[str], None],
        interval: float,
    ) -> None:
        self.source = source
        self.current = current
        self.events = events
        self.install_svid = install_svid
        self.install_policy = install_policy
        self.count_renewal = count_renewal
        self.interval = interval

    def _load_svid(self) -> None:
        identity = self.current.identity
        svid = load_svid(
            self.source, identity, identity.trust_domain, self.current.wall(), self.current.skew
        )
        self.install_svid(svid, "static")
        self.count_renewal("ok")

    async def start(self) -> None:
        """The first load: a failure here is the sidecar's, and ends it with one line."""
        self._load_svid()
        if self.source.policy is not None:
            trust_domain = self.current.identity.trust_domain
            self.install_policy(load_policy(self.source.policy, trust_domain, 1))

    async def run(self) -> None:
        source = self.source
        svid_files = (source.cert, source.key, source.bundle)
        seen_svid = tuple(stamp(p) for p in svid_files)
        seen_policy = stamp(source.policy) if source.policy else None
        version = self.current.policy.version
        while True:
            await trio.sleep(self.interval)
            now_svid = tuple(stamp(p) for p in svid_files)
            if now_svid != seen_svid:
                seen_svid = now_svid
                try:
                    self._load_svid()
                except MeshIdError as exc:
                    self.count_renewal("error")
                    generation = self.current.generation
                    self.events.emit(
                        "reload_failed",
                        reason=exc.reason,
                        detail=exc.message,
                        keeping_serial=(f"{generation.svid.serial:x}" if generation else None),
                    )
            if source.policy is not None:
                now_policy = stamp(source.policy)
                if now_policy != seen_policy:
                    seen_policy = now_policy
                    try:
                        version += 1
                        self.install_policy(
                            load_policy(source.policy, self.current.identity.trust_domain, version)
                        )
                    except MeshIdError as exc:
                        self.events.emit("reload_failed", reason=exc.reason, detail=exc.message)
