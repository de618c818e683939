"""The X.509-SVID profile: building root and workload certificates, and checking them.

Theory of operation. The authority is a single self-signed root per
generation that signs workload certificates directly; there are no
intermediates, but the checker accepts a chain of them so that a bundle
from elsewhere still verifies. Building and checking are pure functions of
their inputs: the time is always a parameter, never read from a clock, so
the same code answers "is this valid now" in the sidecar and "would this be
valid then" in tests.

The profile (SPIFFE X509-SVID specification, sections 4 and 5):
  leaf  exactly one URI SAN holding a SPIFFE ID with a path; CA:FALSE;
        keyUsage digitalSignature, never keyCertSign/cRLSign;
        EKU serverAuth + clientAuth (required by us, optional in the spec)
  root  CA:TRUE, critical keyUsage keyCertSign + cRLSign, its URI SAN is the
        trust domain's own ID.
"""

from __future__ import annotations

import ipaddress
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshid.errors import InvalidIdentity, InvalidSvid
from meshid.reasons import Reason
from meshid.spiffeid import SpiffeId, TrustDomain

CLOCK_SKEW = timedelta(seconds=30)

_Ext = TypeVar("_Ext", bound=x509.ExtensionType)

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def generate_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def random_serial() -> int:
    """A random positive 128-bit serial (never zero)."""
    while True:
        serial = secrets.randbits(128)
        if serial:
            return serial


def _signing_hash(key: PrivateKey) -> hashes.SHA256 | hashes.SHA384:
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size > 256:
        return hashes.SHA384()
    return hashes.SHA256()


def build_root(
    trust_domain: TrustDomain,
    key: PrivateKey,
    *,
    not_before: datetime,
    not_after: datetime,
    serial: int | None = None,
    generation: int = 1,
) -> x509.Certificate:
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshid"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"meshid root {generation} {trust_domain}"),
        ]
    )
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(serial if serial is not None else random_serial())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(trust_domain.id))]),
            critical=False,
        )
        .sign(key, _signing_hash(key))
    )


def build_svid(
    *,
    subject_key: PublicKey,
    spiffe_id: SpiffeId,
    issuer: x509.Certificate,
    issuer_key: PrivateKey,
    now: datetime,
    ttl: timedelta,
    dns_names: Iterable[str] = (),
    ip_addresses: Iterable[IpAddress] = (),
    serial: int | None = None,
) -> x509.Certificate:
    """Sign a workload certificate. The caller decides the identity and lifetime.

    NotBefore is backdated by CLOCK_SKEW so a peer whose clock runs a little
    behind accepts it at once; NotAfter never outlives the issuer.
    """
    spiffe_id.require_workload()
    not_before = max(now - CLOCK_SKEW, issuer.not_valid_before_utc)
    not_after = min(now + ttl, issuer.not_valid_after_utc)
    if not_after <= now:
        raise InvalidSvid(
            "the signing root has expired; rotate the root first", reason=Reason.EXPIRED
        )
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(str(spiffe_id))]
    sans += [x509.DNSName(name) for name in dns_names]
    sans += [x509.IPAddress(ip) for ip in ip_addresses]
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshid"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, spiffe_id.trust_domain.name[:64]),
        ]
    )
    issuer_ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject)
        .public_key(subject_key)
        .serial_number(serial if serial is not None else random_serial())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(subject_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(issuer_key, _signing_hash(issuer_key))
    )


# --- checking -----------------------------------------------------------------

# cryptography parses a certificate's fields lazily, so a malformed one (a
# peer's, say) raises from whichever accessor first touches the bad part, and
# not always a ValueError.
_MALFORMED = (
    ValueError,
    TypeError,
    UnsupportedAlgorithm,
    x509.DuplicateExtension,
    x509.UnsupportedGeneralNameType,
)


def _malformed(what: str) -> InvalidSvid:
    return InvalidSvid(f"{what} is malformed", reason=Reason.MALFORMED_CERTIFICATE)


def _check_well_formed(cert: x509.Certificate, what: str) -> None:
    """Parse every field the checks below read, so a defect is an InvalidSvid here."""
    try:
        _ = (
            cert.extensions,
            cert.issuer,
            cert.subject,
            cert.not_valid_before_utc,
            cert.not_valid_after_utc,
        )
    except _MALFORMED:
        raise _malformed(what) from None


def _extension(cert: x509.Certificate, kind: type[_Ext]) -> _Ext | None:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None
    except _MALFORMED:
        raise _malformed("certificate") from None


def uri_sans(cert: x509.Certificate) -> list[str]:
    san = _extension(cert, x509.SubjectAlternativeName)
    return [] if san is None else san.get_values_for_type(x509.UniformResourceIdentifier)


def leaf_spiffe_id(cert: x509.Certificate) -> SpiffeId:
    """The SPIFFE ID of a workload certificate, with the profile's name rules checked."""
    uris = uri_sans(cert)
    if not uris:
        raise InvalidSvid("certificate has no URI SAN", reason=Reason.NO_SPIFFE_ID)
    if len(uris) > 1:
        raise InvalidSvid(
            f"certificate has {len(uris)} URI SANs; an SVID has exactly one",
            reason=Reason.MULTIPLE_URI_SANS,
        )
    try:
        sid = SpiffeId.parse(uris[0])
    except InvalidIdentity as exc:
        raise InvalidSvid(
            f"URI SAN is not a SPIFFE ID: {exc}", reason=Reason.INVALID_SPIFFE_ID
        ) from None
    if not sid.is_workload:
        raise InvalidSvid(
            f"{sid}: a workload SVID's ID needs a path", reason=Reason.INVALID_SPIFFE_ID
        )
    return sid


def check_validity(cert: x509.Certificate, now: datetime, what: str = "certificate") -> None:
    if now < cert.not_valid_before_utc:
        raise InvalidSvid(
            f"{what} is not valid before {cert.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ}",
            reason=Reason.NOT_YET_VALID,
        )
    if now > cert.not_valid_after_utc:
        raise InvalidSvid(
            f"{what} expired at {cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}",
            reason=Reason.EXPIRED,
        )


def check_leaf_profile(cert: x509.Certificate) -> SpiffeId:
    """Everything the X509-SVID profile asks of a leaf, except time and signature."""
    sid = leaf_spiffe_id(cert)
    bc = _extension(cert, x509.BasicConstraints)
    if bc is not None and bc.ca:
        raise InvalidSvid(f"{sid}: leaf certificate has CA:TRUE", reason=Reason.LEAF_IS_CA)
    ku = _extension(cert, x509.KeyUsage)
    if ku is None or not ku.digital_signature:
        raise InvalidSvid(
            f"{sid}: leaf lacks keyUsage digitalSignature", reason=Reason.BAD_KEY_USAGE
        )
    if ku.key_cert_sign or ku.crl_sign:
        raise InvalidSvid(
            f"{sid}: leaf may not carry keyCertSign or cRLSign", reason=Reason.LEAF_IS_CA
        )
    return sid


def check_authority_profile(cert: x509.Certificate) -> None:
    bc = _extension(cert, x509.BasicConstraints)
    if bc is None or not bc.ca:
        raise InvalidSvid("signing certificate is not a CA", reason=Reason.INVALID_CHAIN)
    ku = _extension(cert, x509.KeyUsage)
    if ku is not None and not ku.key_cert_sign:
        raise InvalidSvid("signing certificate lacks keyCertSign", reason=Reason.INVALID_CHAIN)


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    if cert.issuer != issuer.subject:
        return False
    try:
        cert.verify_directly_issued_by(issuer)
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
        return False
    return True


@dataclass(frozen=True, slots=True)
class VerifiedSvid:
    spiffe_id: SpiffeId
    leaf: x509.Certificate
    root: x509.Certificate


def verify_svid(
    chain: Sequence[x509.Certificate],
    roots: Sequence[x509.Certificate],
    now: datetime,
) -> VerifiedSvid:
    """Path validation of `chain` (leaf first) against `roots`, SPIFFE-strict.

    `roots` must be the authorities of the leaf's own trust domain: the caller
    picks them from its bundles by the leaf's trust domain.
    """
    if not chain:
        raise InvalidSvid("no certificate presented", reason=Reason.NO_CERTIFICATE)
    for index, cert in enumerate(chain):
        _check_well_formed(cert, "certificate" if index == 0 else "intermediate certificate")
    leaf = chain[0]
    sid = check_leaf_profile(leaf)
    check_validity(leaf, now, f"{sid} certificate")
    current = leaf
    intermediates = list(chain[1:])
    for _depth in range(len(intermediates) + 1):
        for root in roots:
            if _signed_by(current, root):
                check_authority_profile(root)
                check_validity(root, now, "trust anchor")
                return VerifiedSvid(sid, leaf, root)
        step = next((c for c in intermediates if _signed_by(current, c)), None)
        if step is None:
            break
        check_authority_profile(step)
        check_validity(step, now, "intermediate certificate")
        intermediates.remove(step)
        current = step
    raise InvalidSvid(
        f"{sid}: certificate does not chain to a trust anchor of {sid.trust_domain}",
        reason=Reason.UNTRUSTED_CERTIFICATE,
    )


# --- encoding -----------------------------------------------------------------


def certs_to_pem(certs: Iterable[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def certs_from_pem(data: bytes, what: str = "certificate file") -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise InvalidSvid(f"{what}: not PEM certificates", reason=Reason.INVALID_PEM) from None
    return certs


def key_to_pem(key: PrivateKey, passphrase: bytes | None = None) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def key_from_pem(data: bytes, passphrase: bytes | None = None, what: str = "key") -> PrivateKey:
    """Load a private key; the messages never echo key material."""
    try:
        key = serialization.load_pem_private_key(data, password=passphrase)
    except TypeError:
        if passphrase is None:
            raise InvalidSvid(
                f"{what} is encrypted: give the passphrase", reason=Reason.PASSPHRASE_REQUIRED
            ) from None
        raise InvalidSvid(f"{what} is not encrypted but a passphrase was given") from None
    except ValueError:
        if passphrase is not None:
            raise InvalidSvid(
                f"{what}: wrong passphrase, or not a PEM private key", reason=Reason.BAD_PASSPHRASE
            ) from None
        raise InvalidSvid(f"{what}: not a PEM private key", reason=Reason.INVALID_KEY) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise InvalidSvid(f"{what}: unsupported key type", reason=Reason.INVALID_KEY)
    return key


def public_key_matches(key: PrivateKey, cert: x509.Certificate) -> bool:
    fmt = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    return key.public_key().public_bytes(der, fmt) == cert.public_key().public_bytes(der, fmt)
