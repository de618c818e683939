"""JWT-SVID rules, pure: tokens built here, time injected, every refusal with its reason."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from meshid.jwtsvid import (
    InvalidJwtSvid,
    check_audience,
    claims,
    key_id,
    keys_from_jwks,
    public_jwk,
    sign,
    validate,
)
from meshid.spiffeid import SpiffeId, TrustDomain

TD = TrustDomain("example.org")
WEB = SpiffeId(TD, "/web")
NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
KEY = ec.generate_private_key(ec.SECP256R1())
KID = key_id(KEY.public_key())
KEYS = {TD: {KID: KEY.public_key()}}


def token(**overrides: object) -> str:
    payload = {**claims(WEB, ["db"], NOW), **overrides}
    return sign(payload, KEY, KID)


def reason_of(tok: str, audience: str = "db", at: datetime = NOW) -> str:
    with pytest.raises(InvalidJwtSvid) as caught:
        validate(tok, audience, KEYS, at)
    return caught.value.reason


def test_a_valid_token() -> None:
    subject, verified = validate(token(), "db", KEYS, NOW + timedelta(minutes=4))
    assert subject == WEB
    assert verified["aud"] == ["db"] and verified["exp"] - verified["iat"] == 300


def test_expiry_and_not_before_use_the_injected_clock() -> None:
    assert reason_of(token(), at=NOW + timedelta(minutes=6)) == "jwt_expired"
    assert reason_of(token(nbf=int(NOW.timestamp()) + 600)) == "jwt_expired"
    assert reason_of(token(exp="soon")) == "jwt_malformed"


def test_audience() -> None:
    assert reason_of(token(), audience="other") == "jwt_audience"
    validate(token(aud="db"), "db", KEYS, NOW)  # a single string is a list of one


def test_alg_none_and_hmac_are_refused() -> None:
    unsigned = jwt.encode(claims(WEB, ["db"], NOW), None, algorithm="none", headers={"kid": KID})
    assert reason_of(unsigned) == "jwt_algorithm"
    pem = KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    # the classic confusion: HMAC keyed with the public key; refused before any verification
    header = base64.urlsafe_b64encode(json.dumps({"alg": "HS256", "kid": KID}).encode()).rstrip(
        b"="
    )
    body = base64.urlsafe_b64encode(json.dumps(claims(WEB, ["db"], NOW)).encode()).rstrip(b"=")
    import hashlib
    import hmac

    sig = hmac.new(pem, header + b"." + body, hashlib.sha256).digest()
    forged = (header + b"." + body + b"." + base64.urlsafe_b64encode(sig).rstrip(b"=")).decode()
    assert reason_of(forged) == "jwt_algorithm"


def test_kid_subject_and_signature() -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    assert reason_of(sign(claims(WEB, ["db"], NOW), other, "nope")) == "jwt_unknown_key"
    assert reason_of(sign(claims(WEB, ["db"], NOW), other, KID)) == "jwt_signature"
    foreign = SpiffeId(TrustDomain("other.org"), "/web")
    assert reason_of(sign(claims(foreign, ["db"], NOW), KEY, KID)) == "untrusted_trust_domain"
    assert reason_of(token(sub="not-an-id")) == "jwt_malformed"
    assert reason_of("garbage") == "jwt_malformed"
    tampered = token().rsplit(".", 1)
    body = json.loads(base64.urlsafe_b64decode(tampered[0].split(".")[1] + "=="))
    body["aud"] = ["other"]
    new_body = base64.urlsafe_b64encode(json.dumps(body).encode()).rstrip(b"=").decode()
    head = tampered[0].split(".")[0]
    assert reason_of(f"{head}.{new_body}.{tampered[1]}", audience="other") == "jwt_signature"


def test_bundle_entries_round_trip_and_rsa() -> None:
    entry = public_jwk(KEY.public_key())
    assert entry["use"] == "jwt-svid" and entry["kid"] == KID
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    doc = {"keys": [entry, public_jwk(rsa_key.public_key()), {"use": "x509-svid", "kty": "EC"}]}
    keys = keys_from_jwks(doc)
    assert set(keys) == {KID, key_id(rsa_key.public_key())}
    rs = sign(claims(WEB, ["db"], NOW), rsa_key, key_id(rsa_key.public_key()))
    assert jwt.get_unverified_header(rs)["alg"] == "RS256"
    assert validate(rs, "db", {TD: keys}, NOW)[0] == WEB
    with pytest.raises(InvalidJwtSvid):
        keys_from_jwks({"keys": [{"use": "jwt-svid", "kty": "EC"}]})


def test_audience_limits() -> None:
    with pytest.raises(InvalidJwtSvid):
        check_audience([])
    with pytest.raises(InvalidJwtSvid):
        check_audience([""])
    with pytest.raises(InvalidJwtSvid):
        check_audience(["a"] * 17)
    assert check_audience(["a", "b"]) == ("a", "b")


def test_an_ec_key_whose_coordinate_starts_with_a_zero_byte_round_trips() -> None:
    """RFC 7518 wants each coordinate at the curve's full length, leading zeros kept.

    About one P-256 key in 128 has such an x; a shortened encoding is refused
    by strict readers (PyJWT's among them), so the bundle must never write one.
    """
    for _ in range(5000):  # misses all 5000 with odds of about e**-39
        key = ec.generate_private_key(ec.SECP256R1()).public_key()
        if key.public_numbers().x < 1 << 248:
            break
    else:
        pytest.fail("no key with a leading zero byte in x")
    entry = public_jwk(key)
    assert len(base64.urlsafe_b64decode(entry["x"] + "=")) == 32
    assert keys_from_jwks({"keys": [entry]})[entry["kid"]].public_numbers() == key.public_numbers()
