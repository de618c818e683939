"""Trust bundles as PEM and as SPIFFE bundles (JWK Sets): round trips, defects, fuzz."""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import warnings
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from meshid.bundle import TrustBundle, merge_roots
from meshid.errors import InvalidSvid
from meshid.spiffeid import TrustDomain
from meshid.svid import PrivateKey, build_root, generate_key

NOW = datetime(2030, 6, 1, tzinfo=UTC)
TD = TrustDomain("example.org")
FUZZ = settings(max_examples=250, deadline=None)


def root_cert(key: PrivateKey | None = None) -> x509.Certificate:
    return build_root(
        TD,
        key or generate_key(),
        not_before=NOW - timedelta(days=1),
        not_after=NOW + timedelta(days=365),
    )


@pytest.fixture(scope="module")
def roots() -> tuple[x509.Certificate, ...]:
    return (
        root_cert(),
        root_cert(ec.generate_private_key(ec.SECP384R1())),
        root_cert(rsa.generate_private_key(public_exponent=65537, key_size=2048)),
    )


@pytest.fixture(scope="module")
def spiffe_doc(roots: tuple[x509.Certificate, ...]) -> dict[str, Any]:
    return TrustBundle(TD, roots, sequence=7, refresh_hint=300).to_spiffe()


def test_pem_round_trip(roots: tuple[x509.Certificate, ...]) -> None:
    bundle = TrustBundle(TD, roots, sequence=3)
    again = TrustBundle.from_pem(TD, bundle.to_pem(), sequence=3)
    assert again.roots == roots
    assert again.same_roots(bundle)
    assert all(again.contains(c) for c in roots)
    assert not again.contains(root_cert())


@pytest.mark.parametrize(
    "data",
    [b"", b"not pem at all", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"],
)
def test_pem_without_certificates_is_refused(data: bytes) -> None:
    with pytest.raises(InvalidSvid) as info:
        TrustBundle.from_pem(TD, data)
    assert info.value.reason == "invalid_pem"


def test_spiffe_round_trip(roots: tuple[x509.Certificate, ...], spiffe_doc: dict[str, Any]) -> None:
    bundle = TrustBundle(TD, roots, sequence=7, refresh_hint=300)
    again = TrustBundle.from_spiffe_json(TD, bundle.to_spiffe_json())
    assert again.roots == roots
    assert (again.sequence, again.refresh_hint) == (7, 300)
    for entry in spiffe_doc["keys"]:
        assert entry["use"] == "x509-svid"
        assert len(entry["x5c"]) == 1
        assert "kid" not in entry
    assert [e["kty"] for e in spiffe_doc["keys"]] == ["EC", "EC", "RSA"]
    assert [e.get("crv") for e in spiffe_doc["keys"]] == ["P-256", "P-384", None]


def test_spiffe_entries_of_other_uses_are_skipped(spiffe_doc: dict[str, Any]) -> None:
    doc = copy.deepcopy(spiffe_doc)
    doc["keys"][0]["use"] = "jwt-svid"
    assert len(TrustBundle.from_spiffe_json(TD, json.dumps(doc)).roots) == 2


def _mutated(doc: dict[str, Any], change: str) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    first = doc["keys"][0]
    if change == "key does not match certificate":
        first["x"] = doc["keys"][1]["x"]
    elif change == "curve does not match certificate":
        first["crv"] = "P-384"
    elif change == "kty does not match certificate":
        first["kty"] = "RSA"
    elif change == "two certificates in x5c":
        first["x5c"] = first["x5c"] * 2
    elif change == "no x5c":
        del first["x5c"]
    elif change == "x5c not base64":
        first["x5c"] = ["***"]
    elif change == "x5c not a certificate":
        first["x5c"] = [base64.b64encode(b"hello").decode()]
    elif change == "x not base64url":
        first["x"] = "!!"
    elif change == "x not a string":
        first["x"] = 5
    elif change == "entry not an object":
        doc["keys"][0] = "key"
    elif change == "keys not an array":
        doc["keys"] = {}
    elif change == "negative sequence":
        doc["spiffe_sequence"] = -1
    elif change == "boolean sequence":
        doc["spiffe_sequence"] = True
    elif change == "string refresh hint":
        doc["spiffe_refresh_hint"] = "60"
    else:
        raise AssertionError(change)
    return doc


@pytest.mark.parametrize(
    "change",
    [
        "key does not match certificate",
        "curve does not match certificate",
        "kty does not match certificate",
        "two certificates in x5c",
        "no x5c",
        "x5c not base64",
        "x5c not a certificate",
        "x not base64url",
        "x not a string",
        "entry not an object",
        "keys not an array",
        "negative sequence",
        "boolean sequence",
        "string refresh hint",
    ],
)
def test_defective_spiffe_bundles_are_refused(spiffe_doc: dict[str, Any], change: str) -> None:
    with pytest.raises(InvalidSvid) as info:
        TrustBundle.from_spiffe_json(TD, json.dumps(_mutated(spiffe_doc, change)))
    assert info.value.reason == "invalid_bundle"
    assert "\n" not in info.value.message


@pytest.mark.parametrize(
    "data",
    [b"", b"{", b"[]", b"null", b'{"keys": null}', b"\xff\xfe", "[" * 100_000, "1" * 5000],
)
def test_non_bundles_are_refused(data: bytes | str) -> None:
    with pytest.raises(InvalidSvid) as info:
        TrustBundle.from_spiffe_json(TD, data)
    assert info.value.reason == "invalid_bundle"


def test_merge_roots_keeps_first_appearance(roots: tuple[x509.Certificate, ...]) -> None:
    a, b, c = roots
    assert merge_roots([a, b], [b, c, a]) == (a, b, c)


# --- fuzzing ------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.sampled_from(["x509-svid", "EC", "RSA", "P-256", "AQAB", "MAo="]),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
jwk_fields = st.sampled_from(["use", "kty", "crv", "x", "y", "n", "e", "x5c", "kid"])
jwks = st.dictionaries(jwk_fields, json_values, max_size=8)
bundle_like = st.fixed_dictionaries(
    {"keys": st.lists(jwks, max_size=3)},
    optional={"spiffe_sequence": json_values, "spiffe_refresh_hint": json_values},
)


@FUZZ
@given(st.one_of(json_values, bundle_like).map(json.dumps) | st.text() | st.binary())
def test_arbitrary_json_raises_only_invalid_svid(data: str | bytes) -> None:
    with contextlib.suppress(InvalidSvid):
        TrustBundle.from_spiffe_json(TD, data)


@FUZZ
@given(data=st.data())
def test_mangled_certificates_in_x5c_raise_only_invalid_svid(
    spiffe_doc: dict[str, Any], data: st.DataObject
) -> None:
    doc = copy.deepcopy(spiffe_doc)
    entry = doc["keys"][data.draw(st.integers(0, len(doc["keys"]) - 1))]
    der = bytearray(base64.b64decode(entry["x5c"][0]))
    for _ in range(data.draw(st.integers(1, 3))):
        der[data.draw(st.integers(0, len(der) - 1))] = data.draw(st.integers(0, 255))
    entry["x5c"] = [base64.b64encode(bytes(der)).decode()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cryptography's RFC 5280 grumbles while parsing
        with contextlib.suppress(InvalidSvid):
            TrustBundle.from_spiffe_json(TD, json.dumps(doc))


def test_pem_export_is_plain_certificates(roots: tuple[x509.Certificate, ...]) -> None:
    pem = TrustBundle(TD, roots).to_pem()
    assert pem.count(b"-----BEGIN CERTIFICATE-----") == 3
    assert x509.load_pem_x509_certificates(pem)[0].public_bytes(
        serialization.Encoding.DER
    ) == roots[0].public_bytes(serialization.Encoding.DER)
