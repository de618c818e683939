"""Static identity: certificate, key, bundle and allow-list from files, reloaded when they change.

Files are polled (stat: inode, size, mtime) rather than watched, which also
works across the symlink swaps Kubernetes does for mounted Secrets. A change
is loaded and checked whole; anything wrong (a half-written file, a key that
does not match, an expired certificate) keeps what is in force and says why.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Collection
from datetime import datetime, timedelta
from pathlib import Path

import trio

from adminhttp import Throttle
from meshid.bundle import TrustBundle
from meshid.errors import ConfigError, InvalidSvid, MeshIdError
from meshid.policy import Policy, is_prefix
from meshid.reasons import Reason
from meshid.spiffeid import SpiffeId, TrustDomain
from meshid.svid import certs_from_pem, key_from_pem
from sidecar.config import StaticSource, parse_policy_file
from sidecar.credentials import Svid
from sidecar.events import EventLog
from sidecar.state import Current

FileStamp = tuple[int, int, int] | None
_UNSEEN = (-1, -1, -1)  # a stamp no file has: the next poll loads it


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
        raise InvalidSvid(f"{what} {path}: {exc.strerror}", reason=Reason.UNREADABLE) from None


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
    federated = tuple(
        TrustBundle.from_pem(td, _read(path, "bundle"), what=f"bundle {path}")
        for td, path in source.federated
    )
    return Svid.check(chain, key, bundle, identity, now, skew, federated)


def load_policy(
    path: Path, trust_domain: TrustDomain, version: int, federated: Collection[TrustDomain] = ()
) -> Policy:
    data = _read(path, "policy")
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"policy {path}: not valid TOML: {exc}") from None
    try:
        rules = parse_policy_file(doc, trust_domain, federated)
    except MeshIdError as exc:
        raise ConfigError(f"policy {path}: {exc.message}") from None
    exact = [(s, t) for s, t in rules if not (is_prefix(s) or is_prefix(t))]
    return Policy.build(
        [(SpiffeId.parse(s), SpiffeId.parse(t)) for s, t in exact],
        version,
        prefix_rules=set(rules) - set(exact),
    )


class StaticIdentity:
    """The static source: loads the files at start, then polls them every `interval` seconds."""

    task = "static_reload"  # its name as a background duty

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
        throttle: Throttle,
    ) -> None:
        self.source = source
        self.current = current
        self.events = events
        self.install_svid = install_svid
        self.install_policy = install_policy
        self.count_renewal = count_renewal
        self.interval = interval
        self.throttle = throttle
        self._seen_svid: tuple[FileStamp, ...] = ()
        self._seen_policy: FileStamp = None
        self._policy_version = 0

    def _load_svid(self) -> None:
        identity = self.current.identity
        svid = load_svid(
            self.source, identity, identity.trust_domain, self.current.wall(), self.current.skew
        )
        self.install_svid(svid, "static")
        self.count_renewal("ok")

    async def start(self) -> None:
        """The first load: a failure here is the sidecar's, and ends it with one line."""
        source = self.source
        self._seen_svid = tuple(stamp(p) for p in source.files())
        self._seen_policy = stamp(source.policy) if source.policy else None
        self._load_svid()
        if source.policy is not None:
            trust_domain = self.current.identity.trust_domain
            self.install_policy(load_policy(source.policy, trust_domain, 1, source.domains()))
        self._policy_version = self.current.policy.version

    async def run(self) -> None:
        """Poll the files until cancelled; what was seen survives a restart of this duty."""
        while True:
            await trio.sleep(self.interval)
            self.poll()

    def poll(self) -> None:
        """Load whatever changed since the last look."""
        source = self.source
        now_svid = tuple(stamp(p) for p in source.files())
        if now_svid != self._seen_svid:
            self._seen_svid = now_svid
            try:
                self._load_svid()
            except MeshIdError as exc:
                self.count_renewal("error")
                generation = self.current.generation
                self._failed(
                    exc,
                    keeping_serial=(f"{generation.svid.serial:x}" if generation else None),
                )
                if exc.reason == Reason.UNREADABLE:
                    self._seen_svid = ()  # a passing fault: look again at the next poll
        if source.policy is not None:
            now_policy = stamp(source.policy)
            if now_policy != self._seen_policy:
                self._seen_policy = now_policy
                try:
                    self._policy_version += 1
                    trust_domain = self.current.identity.trust_domain
                    self.install_policy(
                        load_policy(
                            source.policy, trust_domain, self._policy_version, source.domains()
                        )
                    )
                except MeshIdError as exc:
                    self._failed(exc)
                    if exc.reason == Reason.UNREADABLE:
                        self._seen_policy = _UNSEEN  # a passing fault: look again next poll

    def _failed(self, exc: MeshIdError, **fields: object) -> None:
        """`reload_failed`; a file that stays unreadable is tried each poll, said once a second."""
        if exc.reason == Reason.UNREADABLE:
            held = self.throttle.allow(f"reload_failed:{exc.message}")
            if held is None:
                return
            fields["suppressed"] = held or None
        self.events.emit("reload_failed", reason=exc.reason, detail=exc.message, **fields)
