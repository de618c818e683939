"""The Workload API hands out federated bundles by trust domain, never merged with ours."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from spiffe._proto import workload_pb2

from meshid.bundle import TrustBundle
from meshid.spiffeid import SpiffeId, TrustDomain
from meshid.svid import build_root, build_svid, generate_key
from sidecar.credentials import Svid
from sidecar.workload.service import x509_bundles_message, x509_svid_message

NOW = datetime.now(UTC).replace(microsecond=0)
A = TrustDomain("a.example")
B = TrustDomain("b.example")


def _root(td: TrustDomain) -> tuple[x509.Certificate, object]:
    key = generate_key()
    return build_root(
        td, key, not_before=NOW - timedelta(days=1), not_after=NOW + timedelta(days=1)
    ), key


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def test_federated_bundles_in_svid_and_bundle_responses() -> None:
    a_root, a_key = _root(A)
    b_root, _ = _root(B)
    key = generate_key()
    web = SpiffeId.parse("spiffe://a.example/web")
    leaf = build_svid(
        subject_key=key.public_key(),
        spiffe_id=web,
        issuer=a_root,
        issuer_key=a_key,  # type: ignore[arg-type]
        now=NOW,
        ttl=timedelta(hours=1),
    )
    svid = Svid.check(
        [leaf], key, TrustBundle(A, (a_root,)), web, NOW, federated=(TrustBundle(B, (b_root,)),)
    )
    msg = workload_pb2.X509SVIDResponse()
    msg.ParseFromString(x509_svid_message(svid))
    assert msg.svids[0].bundle == _der(a_root)
    assert dict(msg.federated_bundles) == {"spiffe://b.example": _der(b_root)}
    bundles = workload_pb2.X509BundlesResponse()
    bundles.ParseFromString(x509_bundles_message(svid))
    assert dict(bundles.bundles) == {
        "spiffe://a.example": _der(a_root),
        "spiffe://b.example": _der(b_root),
    }
