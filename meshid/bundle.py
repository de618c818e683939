"""Trust bundles: the root certificates of one trust domain, as PEM or as a SPIFFE bundle.

The SPIFFE format (SPIFFE Trust Domain and Bundle specification, section 4)
is a JWK Set: one key per root with ``use: x509-svid`` and exactly one
certificate in ``x5c``, plus ``spiffe_sequence`` (raised on every change) and
``spiffe_refresh_hint`` (seconds). Parsing checks that each JWK's key
parameters are the key of the certificate it carries.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from meshid.errors import InvalidSvid
from meshid.reasons import Reason
from meshid.spiffeid import TrustDomain
from meshid.svid import certs_from_pem, certs_to_pem

X509_SVID_USE = "x509-svid"
DEFAULT_REFRESH_HINT = 60
_CURVES = {"secp256r1": ("P-256", 32), "secp384r1": ("P-384", 48), "secp521r1": ("P-521", 66)}


def _b64url(value: int, length: int) -> str:
    return base64.urlsafe_b64encode(value.to_bytes(length, "big")).rstrip(b"=").decode()


def _b64url_int(text: Any, what: str) -> int:
    if not isinstance(text, str):
        raise InvalidSvid(f"bundle: {what} is not a string", reason=Reason.INVALID_BUNDLE)
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise InvalidSvid(
            f"bundle: {what} is not base64url", reason=Reason.INVALID_BUNDLE
        ) from None
    return int.from_bytes(raw, "big")


def fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def _jwk(cert: x509.Certificate) -> dict[str, Any]:
    key = cert.public_key()
    entry: dict[str, Any] = {"use": X509_SVID_USE}
    if isinstance(key, ec.EllipticCurvePublicKey):
        crv, size = _CURVES[key.curve.name]
        numbers = key.public_numbers()
        entry.update(kty="EC", crv=crv, x=_b64url(numbers.x, size), y=_b64url(numbers.y, size))
    elif isinstance(key, rsa.RSAPublicKey):
        rsa_numbers = key.public_numbers()
        entry.update(
            kty="RSA",
            n=_b64url(rsa_numbers.n, (rsa_numbers.n.bit_length() + 7) // 8),
            e=_b64url(rsa_numbers.e, (rsa_numbers.e.bit_length() + 7) // 8),
        )
    else:
        raise InvalidSvid("bundle: unsupported root key type", reason=Reason.INVALID_BUNDLE)
    entry["x5c"] = [base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()]
    return entry


def _key_matches(entry: dict[str, Any], cert: x509.Certificate) -> bool:
    try:
        key = cert.public_key()
    except (ValueError, UnsupportedAlgorithm):
        return False
    kty = entry.get("kty")
    if isinstance(key, ec.EllipticCurvePublicKey):
        numbers = key.public_numbers()
        crv = _CURVES.get(key.curve.name, ("?", 0))[0]
        return (
            kty == "EC"
            and entry.get("crv") == crv
            and _b64url_int(entry.get("x"), "x") == numbers.x
            and _b64url_int(entry.get("y"), "y") == numbers.y
        )
    if isinstance(key, rsa.RSAPublicKey):
        rsa_numbers = key.public_numbers()
        return (
            kty == "RSA"
            and _b64url_int(entry.get("n"), "n") == rsa_numbers.n
            and _b64url_int(entry.get("e"), "e") == rsa_numbers.e
        )
    return False


@dataclass(frozen=True, slots=True)
class TrustBundle:
    trust_domain: TrustDomain
    roots: tuple[x509.Certificate, ...]
    sequence: int = 0
    refresh_hint: int = DEFAULT_REFRESH_HINT
    _fingerprints: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_fingerprints", frozenset(fingerprint(c) for c in self.roots))

    def contains(self, cert: x509.Certificate) -> bool:
        return fingerprint(cert) in self._fingerprints

    def same_roots(self, other: TrustBundle) -> bool:
        return self._fingerprints == other._fingerprints

    # -- PEM --

    def to_pem(self) -> bytes:
        return certs_to_pem(self.roots)

    @classmethod
    def from_pem(
        cls, trust_domain: TrustDomain, data: bytes, *, sequence: int = 0, what: str = "bundle"
    ) -> TrustBundle:
        roots = certs_from_pem(data, what)
        if not roots:
            raise InvalidSvid(f"{what}: holds no certificate", reason=Reason.INVALID_BUNDLE)
        return cls(trust_domain, tuple(roots), sequence)

    # -- SPIFFE (JWKS) --

    def to_spiffe(self) -> dict[str, Any]:
        return {
            "keys": [_jwk(c) for c in self.roots],
            "spiffe_sequence": self.sequence,
            "spiffe_refresh_hint": self.refresh_hint,
        }

    def to_spiffe_json(self) -> str:
        return json.dumps(self.to_spiffe(), indent=2) + "\n"

    @classmethod
    def from_spiffe_json(cls, trust_domain: TrustDomain, data: bytes | str) -> TrustBundle:
        try:
            doc = json.loads(data)
        except (ValueError, RecursionError):  # RecursionError: [[[[… nested past the stack
            raise InvalidSvid("bundle: not JSON", reason=Reason.INVALID_BUNDLE) from None
        if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
            raise InvalidSvid("bundle: no 'keys' array", reason=Reason.INVALID_BUNDLE)
        roots: list[x509.Certificate] = []
        for index, entry in enumerate(doc["keys"]):
            if not isinstance(entry, dict):
                raise InvalidSvid(
                    f"bundle: keys[{index}] is not an object", reason=Reason.INVALID_BUNDLE
                )
            if entry.get("use") != X509_SVID_USE:
                continue  # JWT authorities and unknown uses are not ours to judge
            x5c = entry.get("x5c")
            if not isinstance(x5c, list) or len(x5c) != 1 or not isinstance(x5c[0], str):
                raise InvalidSvid(
                    f"bundle: keys[{index}].x5c must hold exactly one certificate",
                    reason=Reason.INVALID_BUNDLE,
                )
            try:
                cert = x509.load_der_x509_certificate(base64.b64decode(x5c[0], validate=True))
            except (binascii.Error, ValueError, x509.InvalidVersion):
                raise InvalidSvid(
                    f"bundle: keys[{index}].x5c is not a DER certificate",
                    reason=Reason.INVALID_BUNDLE,
                ) from None
            if not _key_matches(entry, cert):
                raise InvalidSvid(
                    f"bundle: keys[{index}] key parameters do not match its certificate",
                    reason=Reason.INVALID_BUNDLE,
                )
            roots.append(cert)
        sequence = doc.get("spiffe_sequence", 0)
        hint = doc.get("spiffe_refresh_hint", DEFAULT_REFRESH_HINT)
        if not isinstance(sequence, int) or isinstance(sequence, bool) or sequence < 0:
            raise InvalidSvid(
                "bundle: spiffe_sequence is not a whole number", reason=Reason.INVALID_BUNDLE
            )
        if not isinstance(hint, int) or isinstance(hint, bool) or hint < 0:
            raise InvalidSvid(
                "bundle: spiffe_refresh_hint is not a whole number", reason=Reason.INVALID_BUNDLE
            )
        return cls(trust_domain, tuple(roots), sequence, hint)


def merge_roots(*groups: Sequence[x509.Certificate]) -> tuple[x509.Certificate, ...]:
    """Roots in order of first appearance, each once."""
    seen: set[str] = set()
    out: list[x509.Certificate] = []
    for group in groups:
        for cert in group:
            fp = fingerprint(cert)
            if fp not in seen:
                seen.add(fp)
                out.append(cert)
    return tuple(out)
