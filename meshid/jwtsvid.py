"""JWT-SVIDs as the SPIFFE JWT-SVID specification has them: claims, keys, the validation decision.

Pure: tokens and keys in, a decision out; time is a parameter. JOSE itself
(base64url, the JWS signature, the key-type/algorithm match) is PyJWT's:
a widely used library whose `decode` refuses `alg: none` and HMAC-with-a-
public-key confusion when given an explicit algorithm list; we give it one
algorithm, the token's, after checking it against the specification's list.
PyJWT cannot take an injected clock, so `exp` and `nbf` are checked here.

Validation, in order (each failure a `InvalidJwtSvid` with its reason):
the header parses, its `alg` is one the specification allows, it names a
`kid`; `sub` is a SPIFFE ID of a trust domain we hold keys for; that trust
domain has a key with that `kid`; the signature verifies with it; `exp` is
present and not past, `nbf` (if present) not in the future; the audience
asked for is in `aud`.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from meshid.errors import InvalidInput, MeshIdError
from meshid.reasons import Reason
from meshid.spiffeid import SpiffeId, TrustDomain

JWT_SVID_USE = "jwt-svid"
# The JWT-SVID specification, section 3: the algorithms a validator accepts.
ALLOWED_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512"}
)
DEFAULT_ALGORITHM = "ES256"
DEFAULT_TTL = timedelta(minutes=5)
MAX_TTL = timedelta(hours=1)
MAX_AUDIENCES = 16
MAX_AUDIENCE_LENGTH = 512
MAX_TOKEN_LENGTH = 16 * 1024
LEEWAY = timedelta(seconds=30)  # clocks of issuer and validator may differ this much

PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey
SigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
_CURVES = {"secp256r1": ("P-256", 32), "secp384r1": ("P-384", 48), "secp521r1": ("P-521", 66)}


class InvalidJwtSvid(InvalidInput):
    reason = Reason.JWT_INVALID


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64_int(value: int, length: int | None = None) -> str:
    size = length if length is not None else max(1, (value.bit_length() + 7) // 8)
    return _b64(value.to_bytes(size, "big"))


def _required_members(key: PublicKey) -> dict[str, str]:
    if isinstance(key, ec.EllipticCurvePublicKey):
        crv, size = _CURVES[key.curve.name]
        numbers = key.public_numbers()
        x, y = _b64_int(numbers.x, size), _b64_int(numbers.y, size)
        return {"crv": crv, "kty": "EC", "x": x, "y": y}
    rsa_numbers = key.public_numbers()
    return {"e": _b64_int(rsa_numbers.e), "kty": "RSA", "n": _b64_int(rsa_numbers.n)}


def key_id(key: PublicKey) -> str:
    """The RFC 7638 JWK thumbprint: a `kid` that names the key and nothing else."""
    canonical = json.dumps(_required_members(key), separators=(",", ":"), sort_keys=True)
    return _b64(hashlib.sha256(canonical.encode()).digest())


def public_jwk(key: PublicKey, kid: str | None = None) -> dict[str, str]:
    """A bundle entry: the public key, `use: jwt-svid`, its `kid`."""
    return {**_required_members(key), "use": JWT_SVID_USE, "kid": kid or key_id(key)}


def algorithm_for(key: SigningKey | PublicKey) -> str:
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        return {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}[key.curve.name]
    return "RS256"


def check_audience(audience: Sequence[str]) -> tuple[str, ...]:
    """The audiences of a mint request: one or more short non-empty strings."""
    if not audience:
        raise InvalidJwtSvid("audience: at least one is required", reason=Reason.INVALID_INPUT)
    if len(audience) > MAX_AUDIENCES:
        raise InvalidJwtSvid(
            f"audience: at most {MAX_AUDIENCES} are allowed", reason=Reason.INVALID_INPUT
        )
    for a in audience:
        if not isinstance(a, str) or not a or len(a) > MAX_AUDIENCE_LENGTH:
            raise InvalidJwtSvid(
                "audience: each must be a non-empty string of at most "
                f"{MAX_AUDIENCE_LENGTH} characters",
                reason=Reason.INVALID_INPUT,
            )
    return tuple(audience)


def claims(
    subject: SpiffeId, audience: Sequence[str], now: datetime, ttl: timedelta = DEFAULT_TTL
) -> dict[str, Any]:
    """The claims of a JWT-SVID: `sub`, `aud`, `exp` (required), `iat`."""
    issued = int(now.timestamp())
    return {
        "sub": str(subject),
        "aud": list(check_audience(audience)),
        "exp": issued + int(min(ttl, MAX_TTL).total_seconds()),
        "iat": issued,
    }


def sign(payload: Mapping[str, Any], key: SigningKey, kid: str) -> str:
    return jwt.encode(
        dict(payload), key, algorithm=algorithm_for(key), headers={"kid": kid, "typ": "JWT"}
    )


def keys_from_jwks(doc: Any, *, use: str | None = JWT_SVID_USE) -> dict[str, PublicKey]:
    """The signing keys of a JWK Set, by `kid`; entries of another `use` are skipped.

    `use` is `jwt-svid` for a SPIFFE bundle; None takes the keys of a plain
    OIDC issuer's JWKS, whose entries say `use: sig` or nothing.
    """
    found: dict[str, PublicKey] = {}
    entries = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        raise InvalidJwtSvid("bundle: no 'keys' array", reason=Reason.INVALID_BUNDLE)
    wanted = {use} if use is not None else {None, "sig"}
    for entry in entries:
        if not isinstance(entry, dict) or entry.get("use") not in wanted:
            continue
        kid = entry.get("kid")
        if not isinstance(kid, str) or not kid:
            raise InvalidJwtSvid("bundle: a signing key has no kid", reason=Reason.INVALID_BUNDLE)
        try:
            key = jwt.PyJWK(entry).key
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError, KeyError):
            raise InvalidJwtSvid(
                f"bundle: key {kid[:64]!r} is malformed", reason=Reason.INVALID_BUNDLE
            ) from None
        if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
            raise InvalidJwtSvid(
                f"bundle: key {kid[:64]!r} is not a public EC or RSA key",
                reason=Reason.INVALID_BUNDLE,
            )
        found[kid] = key
    return found


def read_unverified(
    token: str, allowed: frozenset[str] = ALLOWED_ALGORITHMS
) -> tuple[str, str, dict[str, Any]]:
    """(alg, kid, claims) of a token not yet verified: only to choose the key with."""
    if len(token) > MAX_TOKEN_LENGTH:
        raise InvalidJwtSvid("token is too long", reason=Reason.JWT_MALFORMED)
    try:
        header = jwt.get_unverified_header(token)
        unverified = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        raise InvalidJwtSvid("token is not a JWT", reason=Reason.JWT_MALFORMED) from None
    alg = header.get("alg")
    if alg not in allowed:
        raise InvalidJwtSvid(
            f"algorithm {str(alg)[:16]!r} is not allowed", reason=Reason.JWT_ALGORITHM
        )
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise InvalidJwtSvid("token header names no kid", reason=Reason.JWT_UNKNOWN_KEY)
    return str(alg), kid, unverified


def verify_signature(token: str, key: PublicKey, alg: str) -> dict[str, Any]:
    """The claims, once the signature verifies with `key` under exactly `alg`."""
    try:
        verified: dict[str, Any] = jwt.decode(
            token,
            key,
            algorithms=[alg],
            options={
                "verify_exp": False,
                "verify_nbf": False,
                "verify_iat": False,
                "verify_aud": False,
                "verify_iss": False,
            },
        )
    except jwt.InvalidSignatureError:
        raise InvalidJwtSvid("signature does not verify", reason=Reason.JWT_SIGNATURE) from None
    except (jwt.PyJWTError, ValueError, TypeError):
        raise InvalidJwtSvid(
            "token cannot be verified with its key", reason=Reason.JWT_SIGNATURE
        ) from None
    return verified


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def check_times(
    verified: Mapping[str, Any], now: datetime, leeway: timedelta, *, require_iat: bool = False
) -> None:
    """`exp` present and not past, `nbf` and `iat` (if present) not in the future."""
    at, skew = now.timestamp(), leeway.total_seconds()
    exp = _number(verified.get("exp"))
    if exp is None:
        raise InvalidJwtSvid("token has no exp claim", reason=Reason.JWT_MALFORMED)
    if at >= exp + skew:
        raise InvalidJwtSvid("token has expired", reason=Reason.JWT_EXPIRED)
    nbf = _number(verified.get("nbf"))
    if nbf is not None and at < nbf - skew:
        raise InvalidJwtSvid("token is not yet valid", reason=Reason.JWT_EXPIRED)
    iat = _number(verified.get("iat"))
    if require_iat and iat is None:
        raise InvalidJwtSvid("token has no iat claim", reason=Reason.JWT_MALFORMED)
    if iat is not None and at < iat - skew:
        raise InvalidJwtSvid("token was issued in the future", reason=Reason.JWT_EXPIRED)


def validate(
    token: str,
    audience: str,
    keys: Mapping[TrustDomain, Mapping[str, PublicKey]],
    now: datetime,
    leeway: timedelta = LEEWAY,
) -> tuple[SpiffeId, dict[str, Any]]:
    """(subject, claims) of a valid JWT-SVID for `audience`, or InvalidJwtSvid naming why not."""
    alg, kid, unverified = read_unverified(token)
    sub = unverified.get("sub")
    if not isinstance(sub, str):
        raise InvalidJwtSvid("token has no sub claim", reason=Reason.JWT_MALFORMED)
    try:
        subject = SpiffeId.parse(sub)
    except MeshIdError:
        raise InvalidJwtSvid("sub is not a SPIFFE ID", reason=Reason.JWT_MALFORMED) from None
    domain_keys = keys.get(subject.trust_domain)
    if domain_keys is None:
        raise InvalidJwtSvid(
            f"no keys for trust domain {subject.trust_domain}",
            reason=Reason.UNTRUSTED_TRUST_DOMAIN,
        )
    key = domain_keys.get(kid)
    if key is None:
        raise InvalidJwtSvid(f"unknown kid {kid[:64]!r}", reason=Reason.JWT_UNKNOWN_KEY)
    verified = verify_signature(token, key, alg)
    check_times(verified, now, leeway)
    aud = verified.get("aud")
    audiences = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
    if audience not in audiences:
        raise InvalidJwtSvid(
            f"audience {audience[:64]!r} is not in the token's aud", reason=Reason.JWT_AUDIENCE
        )
    return subject, verified
