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
from sidecar.workload.grpc import (
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

    def validate(self, token: str, audience: str) -> tuple[str, dict[str, object]]:
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
    return proto.x509_svid_response([entry])


def x509_bundles_message(svid: Svid) -> bytes:
    return proto.x509_bundles_response(
        {str(svid.spiffe_id.trust_domain.id): _concat_der(list(svid.bundle.roots))}
    )


class WorkloadService:
    def __init__(self, feed: WorkloadFeed, jwt: JwtAuthority | None = None) -> None:
        self.feed = feed
        self.jwt = jwt

    def handlers(self) -> dict[str, Handler]:
        return {
            SERVICE + "FetchX509SVID": self.fetch_x509_svid,
            SERVICE + "FetchX509Bundles": self.fetch_x509_bundles,
            SERVICE + "FetchJWTSVID": self.fetch_jwt_svid,
            SERVICE + "FetchJWTBundles": self.fetch_jwt_bundles,
            SERVICE + "ValidateJWTSVID": self.validate_jwt_svid,
        }

    async def _follow(self, reply: Reply, which: str) -> None:
        """Send the current state, then again each time the feed moves; never returns."""
        seen = -1
        while True:
            version = self.feed.version
            svid = self.feed.current()
            if svid is not None and version != seen:
                if which == "svid":
                    message = x509_svid_message(svid)
                elif which == "bundles":
                    message = x509_bundles_message(svid)
                else:
                    assert self.jwt is not None
                    message = proto.jwt_bundles_response(self.jwt.bundles())
                await reply.send(message)
                seen = version
            await self.feed.wait_changed(version)

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
        subject, claims = jwt.validate(request.svid, request.audience)
        await reply.send(proto.validate_jwt_svid_response(subject, claims))
