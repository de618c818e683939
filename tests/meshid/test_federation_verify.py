"""Per-trust-domain verification: a peer is judged only by its own domain's bundle.

Two real authorities (a.example, b.example), both trusted; the forger is
b.example's authority signing a certificate that claims an a.example ID.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509

from meshid.bundle import TrustBundle
from meshid.errors import InvalidIdentity, InvalidSvid
from meshid.federation import Bundles, resolve_id, verify_in_own_domain
from meshid.reasons import Reason
from meshid.spiffeid import SpiffeId, TrustDomain
from meshid.svid import PrivateKey, build_root, build_svid, generate_key

NOW = datetime(2030, 6, 1, 12, 0, tzinfo=UTC)
A = TrustDomain("a.example")
B = TrustDomain("b.example")
C = TrustDomain("c.example")


def authority(td: TrustDomain) -> tuple[x509.Certificate, PrivateKey]:
    key = generate_key()
    root = build_root(
        td, key, not_before=NOW - timedelta(days=1), not_after=NOW + timedelta(days=30)
    )
    return root, key


def leaf(spiffe_id: str, signer: tuple[x509.Certificate, PrivateKey]) -> x509.Certificate:
    return build_svid(
        subject_key=generate_key().public_key(),
        spiffe_id=SpiffeId.parse(spiffe_id),
        issuer=signer[0],
        issuer_key=signer[1],
        now=NOW,
        ttl=timedelta(hours=1),
    )


@pytest.fixture(scope="module")
def cas() -> dict[TrustDomain, tuple[x509.Certificate, PrivateKey]]:
    return {A: authority(A), B: authority(B), C: authority(C)}


@pytest.fixture(scope="module")
def bundles(cas: dict[TrustDomain, tuple[x509.Certificate, PrivateKey]]) -> Bundles:
    """a.example's view: its own bundle, and b.example federated (c.example not)."""
    return Bundles(TrustBundle(A, (cas[A][0],)), [TrustBundle(B, (cas[B][0],))])


def test_own_and_federated_peers_verify(
    cas: dict[TrustDomain, tuple[x509.Certificate, PrivateKey]], bundles: Bundles
) -> None:
    own = verify_in_own_domain([leaf("spiffe://a.example/web", cas[A])], bundles, NOW)
    assert str(own.spiffe_id) == "spiffe://a.example/web"
    assert own.root == cas[A][0]
    foreign = verify_in_own_domain([leaf("spiffe://b.example/api", cas[B])], bundles, NOW)
    assert str(foreign.spiffe_id) == "spiffe://b.example/api"
    assert foreign.root == cas[B][0]


@pytest.mark.parametrize(
    ("claimed", "signer"),
    [
        ("spiffe://a.example/web", B),  # the federated domain forging one of ours
        ("spiffe://b.example/api", A),  # our own authority forging a federated ID
    ],
)
def test_a_chain_anchored_in_another_domains_bundle_is_untrusted(
    cas: dict[TrustDomain, tuple[x509.Certificate, PrivateKey]],
    bundles: Bundles,
    claimed: str,
    signer: TrustDomain,
) -> None:
    forged = leaf(claimed, cas[signer])
    with pytest.raises(InvalidSvid) as caught:
        verify_in_own_domain([forged], bundles, NOW)
    assert caught.value.reason == Reason.UNTRUSTED_CERTIFICATE
    # Also with the forger's root offered in the chain itself.
    with pytest.raises(InvalidSvid) as caught:
        verify_in_own_domain([forged, cas[signer][0]], bundles, NOW)
    assert caught.value.reason == Reason.UNTRUSTED_CERTIFICATE


def test_a_domain_that_is_not_federated_is_untrusted_trust_domain(
    cas: dict[TrustDomain, tuple[x509.Certificate, PrivateKey]], bundles: Bundles
) -> None:
    with pytest.raises(InvalidSvid) as caught:
        verify_in_own_domain([leaf("spiffe://c.example/db", cas[C])], bundles, NOW)
    assert caught.value.reason == Reason.UNTRUSTED_TRUST_DOMAIN


def test_bundles_of_one_domain_are_never_merged(
    cas: dict[TrustDomain, tuple[x509.Certificate, PrivateKey]],
) -> None:
    with pytest.raises(InvalidSvid, match="two bundles"):
        Bundles(TrustBundle(A, (cas[A][0],)), [TrustBundle(A, (cas[B][0],))])
    both = Bundles(
        TrustBundle(A, (cas[A][0],)), [TrustBundle(C, (cas[C][0],)), TrustBundle(B, (cas[B][0],))]
    )
    assert both.domains() == {A, B, C}
    assert [b.trust_domain for b in both.federated()] == [B, C]


def test_allow_list_ids_may_name_federated_domains_only() -> None:
    assert str(resolve_id("web", A, {B})) == "spiffe://a.example/web"
    assert str(resolve_id("spiffe://b.example/api", A, {B})) == "spiffe://b.example/api"
    with pytest.raises(InvalidIdentity) as caught:
        resolve_id("spiffe://c.example/db", A, {B})
    assert caught.value.reason == Reason.UNTRUSTED_TRUST_DOMAIN
    assert "c.example is not federated with a.example" in str(caught.value)
    with pytest.raises(InvalidIdentity):
        resolve_id("spiffe://b.example", A, {B})  # the trust domain itself is no workload
