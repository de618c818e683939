"""The link to the authority: every request a dynamic sidecar makes, and what it trusts.

One place decides what a request to the control plane is checked against
(the newest bundle known: the current credentials', the persisted one, the
configured one) and which identity it presents (the SVID in memory, since
the state directory's copy may lag behind it or be unreadable), so that
enrollment, renewal, the feed and the report all say the same.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from meshid.errors import ConfigError
from meshid.reasons import Reason
from sidecar.config import AuthoritySource
from sidecar.control import ClientIdentity, ControlClient, HeldIdentity
from sidecar.state import Current
from sidecar.statedir import BUNDLE_FILE, KEY_FILE, SVID_FILE, identity_pem


class AuthorityLink:
    def __init__(self, client: ControlClient, current: Current, source: AuthoritySource) -> None:
        self.client = client
        self.current = current
        self.source = source

    async def ask(
        self,
        method: str,
        target: str,
        body: dict[str, Any] | None,
        *,
        as_client: bool = True,
        wait: float | None = None,
    ) -> dict[str, Any]:
        """One request; `as_client=False` presents no certificate (enrollment)."""
        return await self.client.request(
            method,
            target,
            body,
            bundle_pem=self.trust_pem(),
            now=self.current.wall(),
            trust=self.trust_name(),
            identity=self.client_identity() if as_client else None,
            wait=wait,
        )

    def _path(self, name: str) -> Path:
        return self.source.state_dir / name

    def client_identity(self) -> ClientIdentity | HeldIdentity:
        """The SVID in memory: the state directory's copy may lag behind it or be unreadable."""
        svid = self.current.svid()
        if svid is None:
            return ClientIdentity(self._path(SVID_FILE), self._path(KEY_FILE))
        return HeldIdentity(identity_pem(svid.key, svid.chain))

    def trust_pem(self) -> bytes:
        """The newest bundle known: the current credentials', the persisted one, the configured."""
        svid = self.current.svid()
        if svid is not None:
            return svid.bundle.to_pem()
        for path in (self._path(BUNDLE_FILE), self.source.bundle):
            try:
                return path.read_bytes()
            except OSError:
                continue
        raise ConfigError(
            f"authority.bundle: cannot read {self.source.bundle}", reason=Reason.MISSING_FILE
        )

    def trust_name(self) -> str:
        """What `trust_pem` is, for a message saying the authority does not chain to it."""
        if self.current.svid() is not None:
            return "the trust bundle this sidecar holds (from the authority)"
        return f"authority.bundle ({self.source.bundle})"
