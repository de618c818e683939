"""Hostile CSRs: the authority takes only the public key from them, after proof of possession."""

from __future__ import annotations

import ipaddress
import warnings
from collections.abc import Callable
from datetime import UTC, datetime

import pytest
from ca_helpers import Clock, make_csr
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes as AnyKey,
)
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from ca.authority import Authority
from ca.issuer import MAX_CSR_BYTES, csr_public_key, parse_csr, sign_csr
from meshid.errors import CsrRejected
from meshid.svid import verify_svid

FUZZ = settings(max_examples=250, deadline=None)
HOSTILE_SANS: list[x509.GeneralName] = [
    x509.DNSName("evil.example.com"),
    x509.DNSName("localhost"),
    x509.UniformResourceIdentifier("spiffe://example.org/admin"),
    x509.UniformResourceIdentifier("spiffe://other.org/web"),
    x509.IPAddress(ipaddress.ip_address("10.6.6.6")),
]
# Names the authority ignores: a CSR may ask, the certificate will not carry them.
IGNORED_SANS = [san for san in HOSTILE_SANS if not isinstance(san, x509.UniformResourceIdentifier)]


def _sans(cert: x509.Certificate) -> x509.SubjectAlternativeName:
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value


def test_enroll_ignores_everything_the_csr_asks_for(authority: Authority, clock: Clock) -> None:
    web = authority.resolve("web")
    token = authority.create_token(
        web, dns_names=["web.internal"], ip_addresses=[ipaddress.ip_address("10.0.0.1")]
    )
    key, csr = make_csr(sans=[*IGNORED_SANS, x509.UniformResourceIdentifier(str(web))], ca=True)
    leaf = authority.enroll(token, csr).leaf
    sans = _sans(leaf)
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://example.org/web"]
    assert sans.get_values_for_type(x509.DNSName) == ["web.internal"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.1")]
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not leaf.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    assert "requested-by-workload" not in leaf.subject.rfc4514_string()
    assert leaf.public_key() == key.public_key()
    assert verify_svid([leaf], authority.bundle().roots, clock()).spiffe_id == web


@pytest.mark.parametrize("asked", ["spiffe://example.org/admin", "spiffe://other.org/web"])
def test_enroll_refuses_a_csr_for_another_id_and_keeps_the_token(
    authority: Authority, asked: str
) -> None:
    web = authority.resolve("web")
    token = authority.create_token(web)
    _, csr = make_csr(sans=[x509.UniformResourceIdentifier(asked)])
    with pytest.raises(CsrRejected) as refused:
        authority.enroll(token, csr)
    assert refused.value.reason == "csr_identity_mismatch"
    assert asked in refused.value.message
    _, good = make_csr()
    assert authority.enroll(token, good).spiffe_id == web


def test_sign_csr_with_no_grant_carries_only_the_spiffe_id(
    authority: Authority, clock: Clock
) -> None:
    _, csr_der = make_csr(sans=HOSTILE_SANS, ca=True)
    _, root, root_key = authority.signer()
    leaf = sign_csr(
        parse_csr(csr_der),
        spiffe_id=authority.resolve("api"),
        issuer=root,
        issuer_key=root_key,
        now=clock(),
        ttl=authority.svid_ttl,
    )
    assert list(_sans(leaf)) == [x509.UniformResourceIdentifier("spiffe://example.org/api")]
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_pem_csr_is_accepted_too() -> None:
    _, der = make_csr()
    pem = x509.load_der_x509_csr(der).public_bytes(serialization.Encoding.PEM)
    assert csr_public_key(parse_csr(pem))


def _tampered_signature(der: bytes) -> bytes:
    """Flip the last byte of the DER: the last byte of the signature's `s`."""
    return der[:-1] + bytes([der[-1] ^ 0x01])


def test_bad_signature_is_refused() -> None:
    _, der = make_csr()
    assert csr_public_key(parse_csr(der))  # positive twin
    tampered = parse_csr(_tampered_signature(der))  # still parses ...
    with pytest.raises(CsrRejected) as info:  # ... but proves nothing
        csr_public_key(tampered)
    assert info.value.reason == "bad_csr_signature"


def _csr_for(key: AnyKey) -> bytes:
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
        .sign(key, algorithm)
    )
    return csr.public_bytes(serialization.Encoding.DER)


@pytest.mark.parametrize(
    ("make_key", "accepted"),
    [
        (lambda: ec.generate_private_key(ec.SECP256R1()), True),
        (lambda: ec.generate_private_key(ec.SECP384R1()), True),
        (lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048), True),
        (lambda: ec.generate_private_key(ec.SECP192R1()), False),
        (lambda: ec.generate_private_key(ec.SECP521R1()), False),
        (lambda: ec.generate_private_key(ec.SECP256K1()), False),
        (lambda: rsa.generate_private_key(public_exponent=65537, key_size=1024), False),
        (ed25519.Ed25519PrivateKey.generate, False),
    ],
    ids=["P-256", "P-384", "RSA-2048", "P-192", "P-521", "secp256k1", "RSA-1024", "Ed25519"],
)
def test_key_types(make_key: Callable[[], AnyKey], accepted: bool) -> None:
    csr = parse_csr(_csr_for(make_key()))
    if accepted:
        assert csr_public_key(csr)
        return
    with pytest.raises(CsrRejected) as info:
        csr_public_key(csr)
    assert info.value.reason == "unsupported_key"
    assert "\n" not in info.value.message


def _certificate_der() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(datetime(2030, 1, 1, tzinfo=UTC))
        .not_valid_after(datetime(2031, 1, 1, tzinfo=UTC))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.DER)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "invalid_csr"),
        (b"garbage", "invalid_csr"),
        (b"\x30\x03\x02\x01\x00", "invalid_csr"),
        (
            b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
            "invalid_csr",
        ),
        (_certificate_der(), "invalid_csr"),
        (b"0" * (MAX_CSR_BYTES + 1), "csr_too_large"),
        (make_csr()[1] + b"\x00" * MAX_CSR_BYTES, "csr_too_large"),
    ],
    ids=["empty", "garbage", "tiny DER", "bad PEM", "certificate", "oversize", "oversize CSR"],
)
def test_non_csrs_are_refused(data: bytes, reason: str) -> None:
    with pytest.raises(CsrRejected) as info:
        parse_csr(data)
    assert info.value.reason == reason


@pytest.mark.parametrize(
    "bad_csr",
    [
        b"garbage",
        _tampered_signature(make_csr()[1]),
        _csr_for(ed25519.Ed25519PrivateKey.generate()),
        b"0" * (MAX_CSR_BYTES + 1),
    ],
    ids=["garbage", "bad signature", "Ed25519", "oversize"],
)
def test_a_refused_csr_does_not_consume_the_token(authority: Authority, bad_csr: bytes) -> None:
    token = authority.create_token(authority.resolve("web"))
    with pytest.raises(CsrRejected):
        authority.enroll(token, bad_csr)
    assert authority.token_grant(token) is not None
    assert authority.enroll(token, make_csr()[1]).spiffe_id == authority.resolve("web")


# --- fuzzing ------------------------------------------------------------------

_GOOD_CSRS = [
    make_csr()[1],
    _csr_for(rsa.generate_private_key(public_exponent=65537, key_size=2048)),
]


@st.composite
def mangled_csrs(draw: st.DrawFn) -> bytes:
    der = bytearray(draw(st.sampled_from(_GOOD_CSRS)))
    for _ in range(draw(st.integers(1, 3))):
        der[draw(st.integers(0, len(der) - 1))] = draw(st.integers(0, 255))
    return bytes(der)


@FUZZ
@given(st.one_of(st.binary(max_size=600), mangled_csrs()))
def test_arbitrary_bytes_raise_only_csr_rejected(data: bytes) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cryptography's RFC 5280 grumbles while parsing
        try:
            csr_public_key(parse_csr(data))
        except CsrRejected as exc:
            assert "\n" not in exc.message
