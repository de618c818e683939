"""Trust across trust domains: each peer is verified against its own domain's bundle.

Pure. Federation adds the bundles of other trust domains, but never merges
them: a certificate is judged only against the bundle of the trust domain
its SPIFFE ID names. Were the roots pooled, b.example's authority could sign
`spiffe://a.example/web` and be believed; here that chain finds no anchor
among a.example's roots and is refused as `untrusted_certificate`.

The ID is read from the leaf before the leaf is trusted; it only selects
which bundle to try, and the chain must then anchor in exactly that bundle.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Mapping, Sequence
from datetime import datetime

from cryptography import x509

from meshid.bundle import TrustBundle
from meshid.errors import InvalidIdentity, InvalidSvid
from meshid.policy import PREFIX_MARK, rule_end
from meshid.reasons import Reason
from meshid.spiffeid import SpiffeId, TrustDomain
from meshid.svid import VerifiedSvid, check_leaf_profile, verify_svid


class Bundles:
    """The bundles a workload trusts, one per trust domain, never merged.

    Built from the own bundle and any number of federated ones; a second
    bundle for one trust domain is refused (`invalid_bundle`), never merged.
    """

    __slots__ = ("_by_domain", "local")

    def __init__(self, local: TrustBundle, federated: Iterable[TrustBundle] = ()) -> None:
        self.local = local.trust_domain
        by_domain: dict[TrustDomain, TrustBundle] = {local.trust_domain: local}
        for bundle in federated:
            if bundle.trust_domain in by_domain:
                raise InvalidSvid(
                    f"two bundles for trust domain {bundle.trust_domain}",
                    reason=Reason.INVALID_BUNDLE,
                )
            by_domain[bundle.trust_domain] = bundle
        self._by_domain: Mapping[TrustDomain, TrustBundle] = by_domain

    def get(self, trust_domain: TrustDomain) -> TrustBundle | None:
        return self._by_domain.get(trust_domain)

    def domains(self) -> frozenset[TrustDomain]:
        return frozenset(self._by_domain)

    def federated(self) -> tuple[TrustBundle, ...]:
        """The foreign bundles, in trust-domain order (what the Workload API lists)."""
        return tuple(
            b
            for td, b in sorted(self._by_domain.items(), key=lambda kv: str(kv[0]))
            if td != self.local
        )


def verify_in_own_domain(
    chain: Sequence[x509.Certificate], bundles: Bundles, now: datetime
) -> VerifiedSvid:
    """Path validation of `chain` (leaf first) against the bundle of the leaf's trust domain.

    Raises InvalidSvid: `untrusted_trust_domain` when that domain is neither
    ours nor federated, `untrusted_certificate` when the chain does not anchor
    in that domain's roots (whatever other bundle it might anchor in).
    """
    if not chain:
        raise InvalidSvid("no certificate presented", reason=Reason.NO_CERTIFICATE)
    claimed = check_leaf_profile(chain[0])
    bundle = bundles.get(claimed.trust_domain)
    if bundle is None:
        raise InvalidSvid(
            f"{claimed} is from trust domain {claimed.trust_domain}, which we do not trust",
            reason=Reason.UNTRUSTED_TRUST_DOMAIN,
        )
    return verify_svid(chain, bundle.roots, now)


def resolve_id(text: str, own: TrustDomain, federated: Collection[TrustDomain]) -> SpiffeId:
    """A workload ID for an allow-list pair: a bare path in `own`, or a full ID of
    `own` or of a federated trust domain. Any other domain is refused, by name."""
    if "://" in text:
        sid = SpiffeId.parse(text)
        if sid.trust_domain != own and sid.trust_domain in federated:
            return sid.require_workload()
        if sid.trust_domain != own:
            raise InvalidIdentity(
                f"{sid}: trust domain {sid.trust_domain} is not federated with {own}",
                reason=Reason.UNTRUSTED_TRUST_DOMAIN,
            )
    return SpiffeId.resolve(text, own).require_workload()


def resolve_rule_end(text: str, own: TrustDomain, federated: Collection[TrustDomain]) -> str:
    """An allow-list rule end (an ID, a bare path, or either followed by ``/*``) of
    our trust domain or of a federated one; any other domain is refused by name."""
    if "://" not in text:
        return rule_end(text, own)  # a bare path is ours
    base = text.removesuffix(PREFIX_MARK)
    sid = resolve_id(base, own, federated)
    return str(sid) + (PREFIX_MARK if base != text else "")


def take_fetched(held: TrustBundle, fetched: TrustBundle) -> TrustBundle:
    """The bundle to hold after a fetch: `fetched`, unless its sequence goes backwards.

    A lower `spiffe_sequence` is an old bundle replayed (or a rolled-back
    server): taking it could bring back a retired root, so it is refused
    (`bundle_sequence_backwards`) and `held` stays.
    """
    if fetched.trust_domain != held.trust_domain:
        raise InvalidSvid(
            f"bundle is for {fetched.trust_domain}, not {held.trust_domain}",
            reason=Reason.INVALID_BUNDLE,
        )
    if fetched.sequence < held.sequence:
        raise InvalidSvid(
            f"{held.trust_domain}: fetched bundle sequence {fetched.sequence} is below "
            f"the held {held.sequence}",
            reason=Reason.BUNDLE_SEQUENCE_BACKWARDS,
        )
    return fetched


def federated_to_json(bundles: Iterable[TrustBundle]) -> dict[str, object]:
    """The feed's `federated_bundles`: trust domain -> its SPIFFE bundle (with its sequence)."""
    return {b.trust_domain.name: b.to_spiffe() for b in bundles}


def federated_from_json(value: object, own: TrustDomain) -> tuple[TrustBundle, ...]:
    """Parse `federated_bundles`; InvalidSvid (`invalid_bundle`) on anything amiss."""
    if value is None:
        return ()  # an authority from before federation
    if not isinstance(value, dict):
        raise InvalidSvid("federated_bundles: must be an object", reason=Reason.INVALID_BUNDLE)
    out = []
    for name, doc in sorted(value.items()):
        td = TrustDomain.parse(name)
        if td == own:
            raise InvalidSvid(
                f"federated_bundles: names our own trust domain {td}",
                reason=Reason.INVALID_BUNDLE,
            )
        out.append(TrustBundle.from_spiffe_json(td, json.dumps(doc)))
    return tuple(out)
