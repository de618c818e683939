"""What the authority will sign: CSR checks and the SVID it makes of one.

Pure. The authority decides the identity, the lifetime and the extra SANs;
from a CSR it takes only the public key, after checking the CSR's signature
(proof that the requester holds the private key) and that the key is of a
type and size we accept. Every name and extension the CSR asks for is
ignored, by construction: nothing from it reaches the certificate builder.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from meshid.errors import CsrRejected
from meshid.spiffeid import SpiffeId
from meshid.svid import IpAddress, PrivateKey, PublicKey, build_svid

MAX_CSR_BYTES = 16 * 1024
_CURVES = ("secp256r1", "secp384r1")


def parse_csr(data: bytes) -> x509.CertificateSigningRequest:
    if len(data) > MAX_CSR_BYTES:
        raise CsrRejected(f"CSR larger than {MAX_CSR_BYTES} bytes", reason="csr_too_large")
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_csr(data)
        return x509.load_der_x509_csr(data)
    except (ValueError, x509.InvalidVersion):
        raise CsrRejected(
            "not a PKCS#10 certificate signing request", reason="invalid_csr"
        ) from None


def csr_public_key(csr: x509.CertificateSigningRequest) -> PublicKey:
    """The key to certify, once the CSR has proven possession of it."""
    try:
        key = csr.public_key()
    except (ValueError, TypeError, UnsupportedAlgorithm):  # e.g. an unknown key or curve OID
        raise CsrRejected("CSR public key is not supported", reason="unsupported_key") from None
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in _CURVES:
            raise CsrRejected(
                f"CSR key curve {key.curve.name} is not accepted (P-256 or P-384)",
                reason="unsupported_key",
            )
    elif isinstance(key, rsa.RSAPublicKey):
        if not 2048 <= key.key_size <= 8192:
            raise CsrRejected(
                f"CSR RSA key of {key.key_size} bits is not accepted (2048 to 8192)",
                reason="unsupported_key",
            )
    else:
        raise CsrRejected(
            f"CSR key type {type(key).__name__.lstrip('_')} is not accepted (EC or RSA)",
            reason="unsupported_key",
        )
    try:
        valid = csr.is_signature_valid
    except (ValueError, TypeError, UnsupportedAlgorithm):
        valid = False
    if not valid:
        raise CsrRejected("CSR signature does not verify", reason="bad_csr_signature")
    return key


def sign_csr(
    csr: x509.CertificateSigningRequest,
    *,
    spiffe_id: SpiffeId,
    issuer: x509.Certificate,
    issuer_key: PrivateKey,
    now: datetime,
    ttl: timedelta,
    dns_names: Iterable[str] = (),
    ip_addresses: Iterable[IpAddress] = (),
) -> x509.Certificate:
    return build_svid(
        subject_key=csr_public_key(csr),
        spiffe_id=spiffe_id,
        issuer=issuer,
        issuer_key=issuer_key,
        now=now,
        ttl=ttl,
        dns_names=dns_names,
        ip_addresses=ip_addresses,
    )


def check_csr_identity(csr: x509.CertificateSigningRequest, spiffe_id: SpiffeId) -> None:
    """Refuse a CSR that names an identity other than the one the caller may have.

    Names are otherwise ignored (the authority decides them), but a CSR that
    asks for another ID is a mistake or an attack and deserves a clear no.
    """
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return
    except ValueError:
        raise CsrRejected("CSR extensions are malformed", reason="invalid_csr") from None
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        if uri != str(spiffe_id):
            shown = uri if len(uri) <= 80 else uri[:77] + "..."
            raise CsrRejected(
                f"CSR asks for {shown!r}, but the caller may only have {spiffe_id}",
                reason="csr_identity_mismatch",
            )
