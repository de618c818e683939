"""The control plane's JWT-SVID endpoint: a sidecar asks, over mTLS, for a token for itself.

    POST /v1/jwt-svid  JwtSvidRequest {spiffe_id, audience}  ->  JwtSvidReply {token, expires_at}

The caller is authenticated exactly as for a renewal (a current SVID of this
trust domain, not revoked); it may ask only for its own SPIFFE ID. The token
is signed with the keyring's newest key; its `kid` is in the SPIFFE bundle.
Pure apart from the keyring: no sockets here.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from ca.jwtkeys import JwtKeyring
from meshid.errors import CsrRejected
from meshid.jwtsvid import DEFAULT_TTL, check_audience, claims, sign
from meshid.reasons import Reason
from meshid.spiffeid import SpiffeId
from meshid.wire import JwtSvidReply, JwtSvidRequest


def mint(
    caller: SpiffeId,
    request: JwtSvidRequest,
    keyring: JwtKeyring,
    now: datetime,
    ttl: timedelta = DEFAULT_TTL,
) -> JwtSvidReply:
    if request.spiffe_id != caller:
        raise CsrRejected(
            f"{caller} may ask for a JWT-SVID for itself only, not {request.spiffe_id}",
            reason=Reason.CSR_IDENTITY_MISMATCH,
        )
    payload = claims(caller, check_audience(request.audience), now, ttl)
    key = keyring.signing_key()
    return JwtSvidReply(sign(payload, key.key, key.kid), int(payload["exp"]))
