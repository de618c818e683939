"""The five RPCs of `SpiffeWorkloadAPI`, on top of a small interface to the sidecar.

The service knows nothing of how the sidecar got its identity: it reads the
current `Svid` from a `WorkloadFeed` (which the sidecar publishes to on every
renewal, reload and bundle change) and, for JWT-SVIDs, asks a `JwtAuthority`
(mint over the control plane, the trust domain's JWT keys, validation). A
streaming RPC sends the state current when it may and then waits for the
feed to move: an idle stream is one parked task, and a caller that reads
slowly skips to the newest state instead of queueing old ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import trio
from cryptography.hazmat.primitives import serialization

from meshid.reasons import Reason
from sidecar.credentials import Svid
from sidecar.workload import proto
from sidecar.workload.grpcwire import (
    INVALID_ARGUMENT,
    PERMISSION_DENIED,
    UNAVAILABLE,
    Call,
    GrpcError,
    Handler,
    Reply,
)

SERVICE = "/SpiffeWorkloadAPI/"
HEADER = "workload.spiffe.io"


class WorkloadFeed:
    """The sidecar's current SVID, and a version that moves on every change."""

    def __init__(self) -> None:
        self._svid: Svid | None = None
        self.version = 0
        self._changed = trio.Event()

    def publish(self, svid: Svid) -> None:
        """Sync, never blocks: called from the sidecar's install path."""
        self._svid = svid
        self.poke()

    def poke(self) -> None:
        """Something besides the SVID changed (the JWT keys): wake the streams."""
        self.version += 1
        changed, self._changed = self._changed, trio.Event()
        changed.set()

    def current(self) -> Svid | None:
        return self._svid

    async def wait_changed(self, seen: int) -> None:
        while self.version == seen:
            await self._changed.wait()


class JwtAuthority(Protocol):
    """What the service needs for JWT-SVIDs; the sidecar supplies one per mode."""

    async def mint(self, audience: tuple[str, ...]) -> str: ...

    def bundles(self) -> Mapping[str, bytes]:
        """JWKS documents (bytes of JSON) by trust domain name."""
        ...

    async def validate(self, token: str, audience: str) -> tuple[str, dict[str, object]]:
        """(subject, claims), or GrpcError(INVALID_ARGUMENT) naming why not."""
        ...


def check_metadata(call: Call) -> None:
    """Every Workload API request carries `workload.spiffe.io: true` (SSRF guard of the spec)."""
    if call.metadata.get(HEADER) != "true":
        raise GrpcError(
            INVALID_ARGUMENT,
            f"security header missing from request: {HEADER}: true",
            reason=Reason.WORKLOAD_API_MISSING_HEADER,
        )


def _decode_error(exc: proto.DecodeError) -> GrpcError:
    return GrpcError(
        INVALID_ARGUMENT, f"malformed request: {exc}", reason=Reason.WORKLOAD_API_BAD_REQUEST
    )


def _concat_der(certs: tuple[object, ...] | list[object]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.DER) for c in certs)  # type: ignore[attr-defined]


def x509_svid_message(svid: Svid) -> bytes:
    """X509SVIDResponse for one SVID: chain and roots as concatenated DER, key as PKCS#8."""
    key = svid.key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    entry = proto.X509Svid(
        spiffe_id=str(svid.spiffe_id),
        x509_svid=_concat_der(list(svid.chain)),
        x509_svid_key=key,
        bundle=_concat_der(list(svid.bundle.roots)),
    )
    return proto.x509_svid_response([entry], _federated(svid))


def _federated(svid: Svid) -> dict[str, bytes]:
    """Federated trust domains' roots, by trust domain ID (never merged with ours)."""
    return {str(b.trust_domain.id): _concat_der(list(b.roots)) for b in svid.federated}


def x509_bundles_message(svid: Svid) -> bytes:
    return proto.x509_bundles_response(
        {str(svid.spiffe_id.trust_domain.id): _concat_der(list(svid.bundle.roots))}
        | _federated(svid)
    )


class WorkloadService:
    def __init__(self, feed: WorkloadFeed, jwt: JwtAuthority | None = None) -> None:
        self.feed = feed
        self.jwt = jwt
        self._cache: dict[str, tuple[int, bytes | None]] = {}

    def handlers(self) -> dict[str, Handler]:
        return {
            SERVICE + "FetchX509SVID": self.fetch_x509_svid,
            SERVICE + "FetchX509Bundles": self.fetch_x509_bundles,
            SERVICE + "FetchJWTSVID": self.fetch_jwt_svid,
            SERVICE + "FetchJWTBundles": self.fetch_jwt_bundles,
            SERVICE + "ValidateJWTSVID": self.validate_jwt_svid,
        }

    async def _follow(self, reply: Reply, which: str) -> None:
        """Send the current state, then again each time it changes; never returns.

        Only a changed message is sent: a JWT key change does not resend the
        same X.509-SVID, and a renewal does not resend the same JWT keys.
        """
        last: bytes | None = None
        while True:
            version = self.feed.version
            message = self._message(which, version)
            if message is not None and message != last:
                await reply.send(message)
                last = message
            await self.feed.wait_changed(version)

    def _message(self, which: str, version: int) -> bytes | None:
        """The message for this state, built once per change however many streams follow it."""
        cached = self._cache.get(which)
        if cached is not None and cached[0] == version:
            return cached[1]
        message: bytes | None = None
        svid = self.feed.current()
        if which == "jwt_bundles":
            assert self.jwt is not None
            bundles = self.jwt.bundles()
            message = proto.jwt_bundles_response(bundles) if bundles else None
        elif svid is not None:
            make = x509_svid_message if which == "svid" else x509_bundles_message
            message = make(svid)
        self._cache[which] = (version, message)
        return message

    @staticmethod
    def _empty(call: Call) -> None:
        try:
            proto.check_empty_request(call.message)
        except proto.DecodeError as exc:
            raise _decode_error(exc) from None

    async def fetch_x509_svid(self, call: Call, reply: Reply) -> None:
        self._empty(call)
        await self._follow(reply, "svid")

    async def fetch_x509_bundles(self, call: Call, reply: Reply) -> None:
        self._empty(call)
        await self._follow(reply, "bundles")

    def _jwt(self) -> JwtAuthority:
        if self.jwt is None:
            raise GrpcError(
                UNAVAILABLE,
                "this sidecar serves no JWT-SVIDs",
                reason=Reason.WORKLOAD_API_JWT_UNAVAILABLE,
            )
        return self.jwt

    async def fetch_jwt_svid(self, call: Call, reply: Reply) -> None:
        jwt = self._jwt()
        try:
            request = proto.JwtSvidRequest.decode(call.message)
        except proto.DecodeError as exc:
            raise _decode_error(exc) from None
        if not request.audience or any(not a for a in request.audience):
            raise GrpcError(
                INVALID_ARGUMENT,
                "audience must be specified",
                reason=Reason.WORKLOAD_API_BAD_REQUEST,
            )
        svid = self.feed.current()
        if svid is None:
            raise GrpcError(
                UNAVAILABLE, "no identity issued yet", reason=Reason.WORKLOAD_API_NO_IDENTITY
            )
        if request.spiffe_id and request.spiffe_id != str(svid.spiffe_id):
            raise GrpcError(
                PERMISSION_DENIED,
                f"this socket serves {svid.spiffe_id} only",
                reason=Reason.WORKLOAD_API_CALLER_NOT_ADMITTED,
            )
        token = await jwt.mint(request.audience)
        await reply.send(proto.jwt_svid_response([(str(svid.spiffe_id), token)]))

    async def fetch_jwt_bundles(self, call: Call, reply: Reply) -> None:
        self._jwt()
        self._empty(call)
        await self._follow(reply, "jwt_bundles")

    async def validate_jwt_svid(self, call: Call, reply: Reply) -> None:
        jwt = self._jwt()
        try:
            request = proto.ValidateJwtSvidRequest.decode(call.message)
        except proto.DecodeError as exc:
            raise _decode_error(exc) from None
        if not request.audience or not request.svid:
            raise GrpcError(
                INVALID_ARGUMENT,
                "audience and svid must be specified",
                reason=Reason.WORKLOAD_API_BAD_REQUEST,
            )
        subject, claims = await jwt.validate(request.svid, request.audience)
        await reply.send(proto.validate_jwt_svid_response(subject, claims))
