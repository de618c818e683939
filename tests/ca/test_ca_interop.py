"""Issued SVIDs and bundles, checked by implementations that are not ours.

`openssl verify -x509_strict` and py-spiffe judge the PEM files; PyJWT judges
the SPIFFE bundle's JWK Set (py-spiffe 0.3 has no parser for it), and its x5c
certificates go to py-spiffe as DER.
"""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path

import jwt
import pytest
import spiffe
from ca_helpers import TD, make_csr, run
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from spiffe.svid.errors import InvalidLeafCertificateError

from ca.authority import Authority
from meshid.clock import system_clock
from meshid.svid import certs_to_pem, key_to_pem

SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def openssl_verify(bundle: Path, svid: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", "verify", "-x509_strict", "-purpose", "sslclient", "-CAfile", bundle, svid],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )


@pytest.fixture
def issued(state: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    result = run(
        "ca", "issue", "--state", str(state), "ns/prod/sa/web", "--out", str(out),
        "--dns", "web.internal", "--ip", "10.0.0.1",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    return out


def test_openssl_verifies_an_issued_svid(issued: Path) -> None:
    result = openssl_verify(issued / "bundle.pem", issued / "svid.pem")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith(": OK")


def test_openssl_verifies_an_enrolled_svid(authority: Authority, tmp_path: Path) -> None:
    token = authority.create_token(authority.resolve("api"))
    issued = authority.enroll(token, make_csr()[1])
    (tmp_path / "svid.pem").write_bytes(certs_to_pem(issued.chain))
    (tmp_path / "bundle.pem").write_bytes(issued.bundle.to_pem())
    result = openssl_verify(tmp_path / "bundle.pem", tmp_path / "svid.pem")
    assert result.returncode == 0, result.stdout + result.stderr


def test_openssl_refuses_it_under_a_foreign_root(issued: Path, tmp_path: Path) -> None:
    Authority.init(
        tmp_path / "other", TD, clock=system_clock()
    ).close()  # same trust domain, another root
    result = openssl_verify(tmp_path / "other" / "bundle.pem", issued / "svid.pem")
    assert result.returncode != 0


def test_py_spiffe_parses_the_svid_and_the_bundle(issued: Path, state: Path) -> None:
    svid = spiffe.X509Svid.parse(
        (issued / "svid.pem").read_bytes(), (issued / "svid.key").read_bytes()
    )
    assert str(svid.spiffe_id) == "spiffe://example.org/ns/prod/sa/web"
    bundle = spiffe.X509Bundle.parse(
        spiffe.TrustDomain("example.org"), (issued / "bundle.pem").read_bytes()
    )
    authorities = bundle.x509_authorities
    assert len(authorities) == 1
    (root,) = authorities
    assert (state / "bundle.pem").read_bytes() == root.public_bytes(serialization.Encoding.PEM)
    svid.leaf.verify_directly_issued_by(root)


def test_py_spiffe_refuses_the_root_as_an_svid(state: Path) -> None:
    # the negative twin: the root certificate (CA, path-less ID) is no workload SVID
    authority = Authority.open(state, clock=system_clock())
    try:
        _, root, key = authority.signer()
    finally:
        authority.close()
    with pytest.raises(InvalidLeafCertificateError):
        spiffe.X509Svid.parse(certs_to_pem([root]), key_to_pem(key))


def test_spiffe_bundle_is_a_valid_jwk_set(state: Path) -> None:
    result = run("ca", "bundle", "--state", str(state), "--format", "spiffe")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["spiffe_sequence"] == 1
    assert isinstance(doc["spiffe_refresh_hint"], int)
    jwks = jwt.PyJWKSet.from_dict(doc)
    assert len(jwks.keys) == len(doc["keys"]) == 2  # every key parses; none was skipped
    # one JWT-SVID signing key, named by its kid, beside the X.509 root
    jwt_entries = [e for e in doc["keys"] if e["use"] == "jwt-svid"]
    assert len(jwt_entries) == 1 and jwt_entries[0]["kid"]
    assert jwt_entries[0]["kty"] == "EC" and jwt_entries[0]["crv"] == "P-256"
    ders = []
    x509_pairs = [
        (e, k) for e, k in zip(doc["keys"], jwks.keys, strict=True) if e["use"] != "jwt-svid"
    ]
    for entry, jwk in x509_pairs:
        assert entry["use"] == "x509-svid"
        assert "kid" not in entry
        assert len(entry["x5c"]) == 1
        der = base64.b64decode(entry["x5c"][0], validate=True)
        cert = x509.load_der_x509_certificate(der)
        assert cert.public_key().public_bytes(*SPKI) == jwk.key.public_bytes(*SPKI)
        ders.append(der)
    bundle = spiffe.X509Bundle.parse_raw(spiffe.TrustDomain("example.org"), b"".join(ders))
    pem = run("ca", "bundle", "--state", str(state)).stdout_bytes
    assert {c.public_bytes(serialization.Encoding.PEM) for c in bundle.x509_authorities} == {pem}


def test_bundle_sequence_holds_while_the_bundle_does_not_change(state: Path) -> None:
    # only init (sequence 1) changes the bundle so far; rotation will raise it
    s = str(state)
    assert run("policy", "allow", "web", "api", "--state", s).exit_code == 0
    assert run("ca", "token", "--state", s, "web").exit_code == 0
    doc = json.loads(run("ca", "bundle", "--state", s, "--format", "spiffe").stdout)
    assert doc["spiffe_sequence"] == 1
