"""What an open authority holds: its state directory, database, clock and caches.

Every part of `ca.authority.Authority` builds on this; the parts themselves are
ca.roots (roots and rollover), ca.issuance (signing, tokens, enrollment and
renewal), ca.access (allow-list, revocations, the feed) and ca.reports.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509

from ca.feedindex import FeedIndex
from ca.store import Store
from meshid.bundle import TrustBundle
from meshid.clock import Clock
from meshid.spiffeid import SpiffeId, TrustDomain
from meshid.svid import (
    PrivateKey,
)


class AuthorityBase:
    def __init__(
        self,
        state_dir: Path,
        store: Store,
        *,
        passphrase: bytes | None = None,
        clock: Clock,
        instance: str = "",
    ) -> None:
        self.state_dir = state_dir
        # The instance whose roots this one signs with ('' on an embedded authority).
        self.instance = instance
        self.store = store
        self._passphrase = passphrase
        self._clock = clock
        with store.read() as conn:
            self.trust_domain = TrustDomain(Store.setting(conn, "trust_domain"))
            self.svid_ttl = timedelta(seconds=int(Store.setting(conn, "svid_ttl")))
            self.key_encrypted = Store.setting(conn, "key_encrypted") == "1"
        self._signer_cache: tuple[int, x509.Certificate, PrivateKey] | None = None
        self._signer_checked: datetime | None = None
        self._verified: dict[bytes, tuple[SpiffeId, int]] = {}
        self._bundle_checked = -math.inf  # monotonic time: its origin is arbitrary
        self._bundle_cache: TrustBundle | None = None
        self._feed_index: FeedIndex | None = None  # ca.access: every sidecar's feed, one version
        self.capped_svids = 0  # SVIDs cut short by the root's expiry, for the server to log
        self.last_capped: tuple[SpiffeId, datetime] | None = None

    def close(self) -> None:
        self.store.close()

    # -- identities --

    def resolve(self, text: str) -> SpiffeId:
        return SpiffeId.resolve(text, self.trust_domain).require_workload()

    def _now(self) -> datetime:
        return self._clock.wall()

    def clock_now(self) -> datetime:
        return self._clock.wall()
