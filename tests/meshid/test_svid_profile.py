"""The X.509-SVID profile: what build_svid makes, and what verify_svid refuses.

The bad certificates are made here with `cryptography` directly, one defect
each, by a forger whose defaults make a good SVID (checked first), so every
negative case differs from a passing one in exactly one way.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from meshid.errors import InvalidIdentity, InvalidSvid
from meshid.spiffeid import SpiffeId, TrustDomain
from meshid.svid import (
    CLOCK_SKEW,
    build_root,
    build_svid,
    generate_key,
    key_from_pem,
    key_to_pem,
    public_key_matches,
    verify_svid,
)

NOW = datetime(2030, 6, 1, 12, 0, tzinfo=UTC)
TD = TrustDomain("example.org")
WEB = SpiffeId.parse("spiffe://example.org/web")


@dataclass(frozen=True)
class Ca:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def make_root(td: TrustDomain = TD, **kwargs: Any) -> Ca:
    key = generate_key()
    kwargs.setdefault("not_before", NOW - timedelta(days=1))
    kwargs.setdefault("not_after", NOW + timedelta(days=365))
    return Ca(build_root(td, key, **kwargs), key)


@pytest.fixture(scope="module")
def root() -> Ca:
    return make_root()


def key_usage(*, digital_signature: bool = True, cert_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def forge(
    signer: Ca,
    *,
    sans: list[x509.GeneralName] | None = None,
    ca: bool = False,
    usage: x509.KeyUsage | None = None,
    not_before: datetime = NOW - timedelta(minutes=1),
    not_after: datetime = NOW + timedelta(hours=1),
) -> x509.Certificate:
    """A leaf signed by `signer`; the defaults make a good SVID for WEB."""
    key = generate_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "test")]))
        .issuer_name(signer.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(usage or key_usage(), critical=True)
    )
    if sans is None:
        sans = [x509.UniformResourceIdentifier(str(WEB))]
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(signer.key, hashes.SHA256())


def uri(text: str) -> x509.UniformResourceIdentifier:
    return x509.UniformResourceIdentifier(text)


# --- what we build --------------------------------------------------------------


def test_built_svid_has_the_profile(root: Ca) -> None:
    key = generate_key()
    leaf = build_svid(
        subject_key=key.public_key(),
        spiffe_id=WEB,
        issuer=root.cert,
        issuer_key=root.key,
        now=NOW,
        ttl=timedelta(hours=1),
        dns_names=["web.internal"],
    )
    verified = verify_svid([leaf], [root.cert], NOW)
    assert verified.spiffe_id == WEB
    assert verified.root == root.cert
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [str(WEB)]
    assert san.get_values_for_type(x509.DNSName) == ["web.internal"]
    bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and not ku.key_cert_sign and not ku.crl_sign
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert leaf.not_valid_before_utc == NOW - CLOCK_SKEW
    assert leaf.not_valid_after_utc == NOW + timedelta(hours=1)
    assert leaf.serial_number > 0
    assert public_key_matches(key, leaf)
    assert not public_key_matches(generate_key(), leaf)


def test_serials_are_random(root: Ca) -> None:
    key = generate_key().public_key()
    serials = {
        build_svid(
            subject_key=key,
            spiffe_id=WEB,
            issuer=root.cert,
            issuer_key=root.key,
            now=NOW,
            ttl=timedelta(hours=1),
        ).serial_number
        for _ in range(5)
    }
    assert len(serials) == 5


def test_svid_never_outlives_its_root() -> None:
    short = make_root(not_after=NOW + timedelta(minutes=10))
    leaf = build_svid(
        subject_key=generate_key().public_key(),
        spiffe_id=WEB,
        issuer=short.cert,
        issuer_key=short.key,
        now=NOW,
        ttl=timedelta(hours=1),
    )
    assert leaf.not_valid_after_utc == short.cert.not_valid_after_utc


def test_expired_root_signs_nothing() -> None:
    old = make_root(not_before=NOW - timedelta(days=2), not_after=NOW - timedelta(days=1))
    with pytest.raises(InvalidSvid) as info:
        build_svid(
            subject_key=generate_key().public_key(),
            spiffe_id=WEB,
            issuer=old.cert,
            issuer_key=old.key,
            now=NOW,
            ttl=timedelta(hours=1),
        )
    assert info.value.reason == "expired"


def test_the_trust_domain_id_gets_no_svid(root: Ca) -> None:
    with pytest.raises(InvalidIdentity):
        build_svid(
            subject_key=generate_key().public_key(),
            spiffe_id=TD.id,
            issuer=root.cert,
            issuer_key=root.key,
            now=NOW,
            ttl=timedelta(hours=1),
        )


def test_root_profile(root: Ca) -> None:
    bc = root.cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    ku = root.cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    san = root.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://example.org"]


# --- what we refuse -------------------------------------------------------------


def test_the_forger_makes_a_good_svid_by_default(root: Ca) -> None:
    assert verify_svid([forge(root)], [root.cert], NOW).spiffe_id == WEB


BAD_LEAVES: list[tuple[str, dict[str, Any], str]] = [
    ("path-less ID", {"sans": [uri("spiffe://example.org")]}, "invalid_spiffe_id"),
    ("not a SPIFFE URI", {"sans": [uri("https://example.org/web")]}, "invalid_spiffe_id"),
    ("bad SPIFFE ID", {"sans": [uri("spiffe://example.org/a//b")]}, "invalid_spiffe_id"),
    ("CA:TRUE", {"ca": True}, "leaf_is_ca"),
    (
        "two URI SANs",
        {"sans": [uri(str(WEB)), uri("spiffe://example.org/api")]},
        "multiple_uri_sans",
    ),
    ("keyCertSign", {"usage": key_usage(cert_sign=True)}, "leaf_is_ca"),
    ("no digitalSignature", {"usage": key_usage(digital_signature=False)}, "bad_key_usage"),
    ("no URI SAN", {"sans": [x509.DNSName("web.example.org")]}, "no_spiffe_id"),
    ("no SAN at all", {"sans": []}, "no_spiffe_id"),
    ("expired", {"not_after": NOW - timedelta(seconds=1)}, "expired"),
    ("not yet valid", {"not_before": NOW + timedelta(seconds=1)}, "not_yet_valid"),
]


@pytest.mark.parametrize(
    ("defect", "override", "reason"), BAD_LEAVES, ids=[case[0] for case in BAD_LEAVES]
)
def test_bad_leaves_are_refused_with_their_reason(
    root: Ca, defect: str, override: dict[str, Any], reason: str
) -> None:
    with pytest.raises(InvalidSvid) as info:
        verify_svid([forge(root, **override)], [root.cert], NOW)
    assert info.value.reason == reason
    assert "\n" not in info.value.message


@pytest.mark.parametrize("same_name", [True, False])
def test_foreign_root_is_untrusted(root: Ca, same_name: bool) -> None:
    # same_name: an impostor root with our trust domain and subject, but its own key
    foreign = make_root(TD if same_name else TrustDomain("other.org"))
    assert (foreign.cert.subject == root.cert.subject) is same_name
    leaf = forge(foreign)
    assert verify_svid([leaf], [foreign.cert], NOW).spiffe_id == WEB  # positive twin
    with pytest.raises(InvalidSvid) as info:
        verify_svid([leaf], [root.cert], NOW)
    assert info.value.reason == "untrusted_certificate"


def test_empty_chain() -> None:
    with pytest.raises(InvalidSvid) as info:
        verify_svid([], [], NOW)
    assert info.value.reason == "no_certificate"


def test_expired_root_is_refused() -> None:
    ca = make_root(not_before=NOW - timedelta(days=2), not_after=NOW + timedelta(days=1))
    leaf = forge(ca)
    later = NOW + timedelta(days=1, seconds=1)
    assert verify_svid([leaf], [ca.cert], NOW)
    with pytest.raises(InvalidSvid) as info:
        verify_svid([forge(ca, not_after=later + timedelta(hours=1))], [ca.cert], later)
    assert info.value.reason == "expired"


def intermediate(signer: Ca, *, ca: bool = True) -> Ca:
    key = generate_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "intermediate")]))
        .issuer_name(signer.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(key_usage(cert_sign=ca), critical=True)
        .sign(signer.key, hashes.SHA256())
    )
    return Ca(cert, key)


def test_chain_through_an_intermediate(root: Ca) -> None:
    mid = intermediate(root)
    leaf = forge(mid)
    assert verify_svid([leaf, mid.cert], [root.cert], NOW).root == root.cert
    with pytest.raises(InvalidSvid) as info:  # without the intermediate it does not chain
        verify_svid([leaf], [root.cert], NOW)
    assert info.value.reason == "untrusted_certificate"


def test_intermediate_that_is_not_a_ca_is_refused(root: Ca) -> None:
    mid = intermediate(root, ca=False)
    with pytest.raises(InvalidSvid) as info:
        verify_svid([forge(mid), mid.cert], [root.cert], NOW)
    assert info.value.reason == "invalid_chain"


@pytest.fixture(scope="module")
def leaf_der(root: Ca) -> bytes:
    return forge(root).public_bytes(serialization.Encoding.DER)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_mangled_peer_certificates_raise_only_invalid_svid(
    root: Ca, leaf_der: bytes, data: st.DataObject
) -> None:
    """A peer's certificate is hostile input: any defect is an InvalidSvid, never a crash."""
    der = bytearray(leaf_der)
    for _ in range(data.draw(st.integers(1, 3))):
        der[data.draw(st.integers(0, len(der) - 1))] = data.draw(st.integers(0, 255))
    with warnings.catch_warnings():
        # cryptography warns about some RFC 5280 slips (a zero serial, a short country
        # name) while parsing; under filterwarnings=error that would end the example
        warnings.simplefilter("ignore")
        try:
            cert = x509.load_der_x509_certificate(bytes(der))
        except (ValueError, x509.InvalidVersion):
            return  # the TLS stack would not have handed it over either
        with contextlib.suppress(InvalidSvid):
            verify_svid([cert], [root.cert], NOW)


# --- keys -------------------------------------------------------------------------


def test_key_pem_round_trip_with_and_without_passphrase() -> None:
    key = generate_key()
    plain = key_to_pem(key)
    assert b"ENCRYPTED" not in plain
    assert key_from_pem(plain).private_numbers() == key.private_numbers()
    sealed = key_to_pem(key, b"correct horse")
    assert b"ENCRYPTED" in sealed
    assert key_from_pem(sealed, b"correct horse").private_numbers() == key.private_numbers()


@pytest.mark.parametrize(
    ("encrypted", "passphrase", "reason"),
    [
        (True, None, "passphrase_required"),
        (True, b"wrong", "bad_passphrase"),
        (False, None, None),  # positive twin
    ],
)
def test_key_errors_never_echo_the_key(
    encrypted: bool, passphrase: bytes | None, reason: str | None
) -> None:
    pem = key_to_pem(generate_key(), b"right" if encrypted else None)
    if reason is None:
        key_from_pem(pem, passphrase)
        return
    with pytest.raises(InvalidSvid) as info:
        key_from_pem(pem, passphrase, "root key")
    assert info.value.reason == reason
    body = b"".join(pem.splitlines()[1:-1]).decode()
    assert body[:16] not in info.value.message
    assert "right" not in info.value.message


@pytest.mark.parametrize("data", [b"", b"garbage", b"-----BEGIN PRIVATE KEY-----\nAAAA\n"])
def test_garbage_keys_are_refused(data: bytes) -> None:
    with pytest.raises(InvalidSvid) as info:
        key_from_pem(data)
    assert info.value.reason == "invalid_key"
