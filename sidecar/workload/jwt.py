"""JWT-SVIDs for the Workload API of an enrolled sidecar: minted by the authority, checked here.

Minting is one mTLS request to the control plane (`POST /v1/jwt-svid`) for
this sidecar's own ID: the sidecar holds no JWT signing key. The trust
domain's JWT keys come from the authority's SPIFFE bundle (`GET /v1/bundle`,
the `use: jwt-svid` entries); they are fetched when the Workload API starts,
every `refresh` seconds after, and at once (at most every `min_refetch`
seconds) when a token names a `kid` we do not hold, so a rotation is seen
without waiting. Every change is published to the feed, which wakes the
`FetchJWTBundles` streams.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from meshid.errors import ConfigError, MeshIdError
from meshid.events import EventLog
from meshid.jwtsvid import (
    InvalidJwtSvid,
    PublicKey,
    SigningKey,
    check_audience,
    claims,
    key_id,
    keys_from_jwks,
    public_jwk,
    sign,
    validate,
)
from meshid.reasons import Reason
from meshid.spiffeid import SpiffeId, TrustDomain
from meshid.wire import BUNDLE, JWT_SVID, JwtSvidReply, JwtSvidRequest
from sidecar.workload.grpcwire import INVALID_ARGUMENT, UNAVAILABLE, GrpcError
from sidecar.workload.service import WorkloadFeed

Call = Callable[[str, str, dict[str, Any] | None], Awaitable[dict[str, Any]]]


class Host(Protocol):
    identity: SpiffeId
    events: EventLog

    def wall_now(self) -> datetime: ...


class ControlPlaneJwt:
    def __init__(
        self,
        host: Host,
        call: Call,
        feed: WorkloadFeed,
        *,
        refresh: float = 30.0,
        min_refetch: float = 5.0,
    ) -> None:
        self.host = host
        self.call = call
        self.feed = feed
        self.refresh = refresh
        self.min_refetch = min_refetch
        self.trust_domain = host.identity.trust_domain
        self._keys: dict[str, PublicKey] = {}
        self._jwks = b""
        self._fetched_at = -float("inf")
        self._fetching: trio.Event | None = None  # set when the fetch in flight ends

    async def mint(self, audience: tuple[str, ...]) -> str:
        try:
            check_audience(audience)
            doc = await self.call(
                "POST", JWT_SVID, JwtSvidRequest(self.host.identity, audience).to_json()
            )
            return JwtSvidReply.parse(doc).token
        except InvalidJwtSvid as exc:
            raise GrpcError(INVALID_ARGUMENT, exc.message, reason=exc.reason) from None
        except MeshIdError as exc:
            raise GrpcError(
                UNAVAILABLE, f"the authority did not mint: {exc.message}", reason=exc.reason
            ) from None

    def bundles(self) -> Mapping[str, bytes]:
        return {str(self.trust_domain.id): self._jwks} if self._jwks else {}

    async def fetch(self) -> None:
        """Fetch the bundle's JWT keys; publish to the feed if they changed.

        One fetch at a time: a caller that finds one in flight (the first,
        started with the sidecar, say) waits for it rather than asking again.
        """
        if self._fetching is not None:
            await self._fetching.wait()
            return
        done = self._fetching = trio.Event()
        try:
            await self._fetch()
        finally:
            self._fetching = None
            done.set()

    async def _fetch(self) -> None:
        self._fetched_at = trio.current_time()
        doc = await self.call("GET", BUNDLE, None)
        keys = keys_from_jwks(doc)
        entries = [e for e in doc.get("keys", []) if isinstance(e, dict) and e.get("kid") in keys]
        jwks = json.dumps({"keys": entries}, sort_keys=True).encode()
        if jwks != self._jwks:
            self._keys, self._jwks = keys, jwks
            self.feed.poke()

    async def run(self) -> None:
        """Keep the keys fresh; a failed fetch keeps the keys held and is retried."""
        while True:
            try:
                await self.fetch()
            except MeshIdError as exc:
                self.host.events.emit("workload_api_jwt_keys", error=exc.message, reason=exc.reason)
            await trio.sleep(self.refresh)

    async def validate(self, token: str, audience: str) -> tuple[str, dict[str, object]]:
        try:
            return self._validate(token, audience)
        except InvalidJwtSvid as exc:
            # a kid we do not know is worth a fetch at most every `min_refetch`, or the
            # end of the fetch in flight (a token minted as the sidecar starts)
            due = (
                trio.current_time() - self._fetched_at >= self.min_refetch
                or self._fetching is not None
            )
            if exc.reason != Reason.JWT_UNKNOWN_KEY or not due:
                raise GrpcError(INVALID_ARGUMENT, exc.message, reason=exc.reason) from None
        with contextlib.suppress(MeshIdError):
            await self.fetch()  # a kid we do not know: perhaps the authority rotated
        try:
            return self._validate(token, audience)
        except InvalidJwtSvid as exc:
            raise GrpcError(INVALID_ARGUMENT, exc.message, reason=exc.reason) from None

    def _validate(self, token: str, audience: str) -> tuple[str, dict[str, object]]:
        keys: dict[TrustDomain, Mapping[str, PublicKey]] = {self.trust_domain: self._keys}
        subject, claims = validate(token, audience, keys, self.host.wall_now())
        return str(subject), claims


class LocalJwt:
    """Static mode: JWT-SVIDs signed here with a configured key, validated against it alone.

    Whoever holds this key can mint a JWT-SVID for any ID of the trust
    domain, so it is as sensitive as a CA key; an enrolled sidecar never holds
    one (the authority signs).
    """

    def __init__(self, host: Host, key: SigningKey) -> None:
        self.host = host
        self.key = key
        self.public = key.public_key()
        self.kid = key_id(self.public)
        self.trust_domain = host.identity.trust_domain
        self._jwks = json.dumps({"keys": [public_jwk(self.public, self.kid)]}).encode()

    async def mint(self, audience: tuple[str, ...]) -> str:
        try:
            payload = claims(self.host.identity, audience, self.host.wall_now())
        except InvalidJwtSvid as exc:
            raise GrpcError(INVALID_ARGUMENT, exc.message, reason=exc.reason) from None
        return sign(payload, self.key, self.kid)

    def bundles(self) -> Mapping[str, bytes]:
        return {str(self.trust_domain.id): self._jwks}

    async def validate(self, token: str, audience: str) -> tuple[str, dict[str, object]]:
        keys: dict[TrustDomain, Mapping[str, PublicKey]] = {
            self.trust_domain: {self.kid: self.public}
        }
        try:
            subject, verified = validate(token, audience, keys, self.host.wall_now())
        except InvalidJwtSvid as exc:
            raise GrpcError(INVALID_ARGUMENT, exc.message, reason=exc.reason) from None
        return str(subject), verified


def load_signing_key(path: Path) -> SigningKey:
    """The static JWT key: a PEM EC or RSA private key that only its owner can read."""
    key_name = "workload_api.jwt_key"
    try:
        info = path.stat()
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{key_name}: cannot read {path}: {exc.strerror}") from None
    if info.st_mode & 0o077:
        raise ConfigError(f"{key_name}: {path} is readable by others (chmod 600 it)")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise ConfigError(f"{key_name}: {path} is not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ConfigError(f"{key_name}: {path} is not an EC or RSA key")
    return key
