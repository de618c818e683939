"""The Workload API's pure parts: our protobuf against py-spiffe's generated classes, the config."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from google.protobuf import json_format
from spiffe._proto import workload_pb2

from ca.jwtkeys import JwtKeyring
from meshid.errors import ConfigError
from sidecar.config import parse_config
from sidecar.workload import proto


def test_responses_read_by_the_generated_classes() -> None:
    svid = proto.X509Svid("spiffe://example.org/web", b"\x30\x01c", b"key", b"\x30\x01r", "h")
    msg = workload_pb2.X509SVIDResponse.FromString(
        proto.x509_svid_response([svid], {"spiffe://other.org": b"fb"})
    )
    assert msg.svids[0].spiffe_id == "spiffe://example.org/web"
    assert msg.svids[0].x509_svid_key == b"key" and msg.svids[0].hint == "h"
    assert dict(msg.federated_bundles) == {"spiffe://other.org": b"fb"}
    assert proto.decode_x509_svid_response(msg.SerializeToString()) == [svid]
    bundles = workload_pb2.X509BundlesResponse.FromString(
        proto.x509_bundles_response({"spiffe://example.org": b"roots"})
    )
    assert dict(bundles.bundles) == {"spiffe://example.org": b"roots"}
    jwts = workload_pb2.JWTSVIDResponse.FromString(proto.jwt_svid_response([("id", "tok")]))
    assert (jwts.svids[0].spiffe_id, jwts.svids[0].svid) == ("id", "tok")
    assert proto.decode_jwt_svid_response(jwts.SerializeToString()) == [("id", "tok")]
    claims = {
        "sub": "x",
        "aud": ["a", "b"],
        "exp": 5,
        "ok": True,
        "n": None,
        "f": 1.5,
        "m": {"k": [1, "two"]},
    }
    validated = workload_pb2.ValidateJWTSVIDResponse.FromString(
        proto.validate_jwt_svid_response("spiffe://example.org/web", claims)
    )
    assert json_format.MessageToDict(validated.claims) == {
        **claims,
        "exp": 5.0,
        "m": {"k": [1.0, "two"]},
    }
    assert proto.decode_validate_response(validated.SerializeToString()) == (
        "spiffe://example.org/web",
        claims,
    )


def test_requests_written_by_the_generated_classes() -> None:
    raw = workload_pb2.JWTSVIDRequest(audience=["a", "b"], spiffe_id="s").SerializeToString()
    assert proto.JwtSvidRequest.decode(raw) == proto.JwtSvidRequest(("a", "b"), "s")
    raw = workload_pb2.ValidateJWTSVIDRequest(audience="a", svid="t").SerializeToString()
    assert proto.ValidateJwtSvidRequest.decode(raw) == proto.ValidateJwtSvidRequest("a", "t")


@pytest.mark.parametrize(
    "data",
    [b"\x0a", b"\x0a\x05ab", b"\x08" + b"\xff" * 11, b"\x0b", b"\x00\x00", b"\x0a\x02\xff\xfe"],
)
def test_malformed_requests_are_decode_errors(data: bytes) -> None:
    with pytest.raises(proto.DecodeError):
        proto.JwtSvidRequest.decode(data)


def _doc(**api: object) -> dict[str, object]:
    return {
        "identity": "web",
        "trust_domain": "example.org",
        "static": {"cert": "c", "key": "k", "bundle": "b"},
        "workload_api": api,
    }


def test_workload_api_config(tmp_path: Path) -> None:
    config = parse_config(_doc(socket="api.sock", allow_uids=[1000], allow_gids=[50]), tmp_path)
    assert config.workload_api is not None
    assert config.workload_api.socket == tmp_path / "api.sock"
    assert config.workload_api.admits(1000, 1) and config.workload_api.admits(7, 50)
    assert not config.workload_api.admits(7, 7)
    with pytest.raises(ConfigError, match=r"workload_api\.allow_uids"):
        parse_config(_doc(socket="api.sock"), tmp_path)
    with pytest.raises(ConfigError, match=r"workload_api\.allow_gids"):
        parse_config(_doc(socket="api.sock", allow_uids=[1], allow_gids=["wheel"]), tmp_path)
    with pytest.raises(ConfigError, match=r"workload_api\.sockt"):
        parse_config(_doc(sockt="x", allow_uids=[1]), tmp_path)
    with pytest.raises(ConfigError, match="longer than a Unix socket"):
        parse_config(_doc(socket="x" * 120, allow_uids=[1]), tmp_path)


def test_jwt_keys_rotate_and_retire(tmp_path: Path) -> None:
    now = [datetime(2026, 1, 1, tzinfo=UTC)]
    ring = JwtKeyring(tmp_path, lambda: now[0], rotate_after=timedelta(days=30))
    first = ring.signing_key()
    assert (first.path.stat().st_mode & 0o777) == 0o600
    assert ring.signing_key().kid == first.kid  # stable until due
    now[0] += timedelta(days=31)
    second = ring.signing_key()
    assert second.kid != first.kid
    assert [e["kid"] for e in ring.bundle_entries()] == [first.kid, second.kid]  # both published
    now[0] += timedelta(days=2)
    assert [e["kid"] for e in ring.bundle_entries()] == [second.kid]  # the old one retired
    # another process opening the same directory agrees on the keys
    assert JwtKeyring(tmp_path, lambda: now[0]).signing_key().kid == second.kid
