"""The feed: what the authority tells one sidecar to enforce, as one typed message.

Part of the authority-sidecar wire (`meshid.wire`, whose docstring gives the
version rule): the pairs that concern the sidecar, every revocation, the trust
bundle, and the additive fields later versions brought (serials revoked one by
one, prefix rules, federated bundles, the address map for transparent
interception). Readers ignore what they do not know, so each addition kept
`WIRE_VERSION`.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from typing import Any

from meshid.spiffeid import SpiffeId
from meshid.wire import WIRE_VERSION, _bad, _int, _object, _spiffe_id, _text

MAX_ADDRESSES = 100_000  # entries in the address map one feed carries


def _federated(value: object) -> str:
    """The feed's optional `federated_bundles` object, kept as JSON text."""
    if value is None:
        return "{}"  # an authority from before federation
    if not isinstance(value, dict):
        raise _bad("authority", "federated_bundles", "must be an object")
    return json.dumps(value, sort_keys=True)


@dataclass(frozen=True, slots=True)
class Feed:
    """What one sidecar enforces: its pairs, every revocation, the trust bundle (PEM)."""

    policy_version: int
    revocation_version: int
    bundle_sequence: int
    pairs: tuple[tuple[SpiffeId, SpiffeId], ...]
    revoked: tuple[SpiffeId, ...]
    bundle: str
    # Additive: SVIDs revoked by serial (lowercase hex); an older authority
    # sends none, an older sidecar ignores them.
    revoked_serials: tuple[int, ...] = ()
    # Additive: prefix rules that can match this sidecar, each end an ID or
    # an ID followed by "/*" (`meshid.policy.rule_end`); versioned with pairs.
    prefix_rules: tuple[tuple[str, str], ...] = ()
    # Federated trust domains' bundles, {TD: SPIFFE bundle}, as JSON text: judged by
    # the receiver (meshid.federation.federated_from_json), which knows its own domain.
    federated: str = "{}"
    # Added without a version bump (an older authority sends none, an older sidecar
    # ignores it): the address map for transparent interception, (IP, port, identity).
    # It changes under the policy version, so that a watcher wakes for it.
    addresses: tuple[tuple[str, int, SpiffeId], ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "v": WIRE_VERSION,
            "policy_version": self.policy_version,
            "revocation_version": self.revocation_version,
            "bundle_sequence": self.bundle_sequence,
            "pairs": [[str(a), str(b)] for a, b in self.pairs],
            "revoked": [str(r) for r in self.revoked],
            "bundle": self.bundle,
            "revoked_serials": [f"{n:x}" for n in self.revoked_serials],
            "prefix_rules": [[a, b] for a, b in self.prefix_rules],
            "federated_bundles": json.loads(self.federated),
            "addresses": [[h, p, str(sid)] for h, p, sid in self.addresses],
        }

    @classmethod
    def parse(cls, doc: object) -> Feed:
        fields = _object(doc, "authority", "feed")
        pairs = fields.get("pairs")
        if not isinstance(pairs, list):
            raise _bad("authority", "pairs", "must be a list")
        parsed: list[tuple[SpiffeId, SpiffeId]] = []
        for i, pair in enumerate(pairs):
            if not isinstance(pair, list) or len(pair) != 2:
                raise _bad("authority", f"pairs[{i}]", "must be a [source, target] pair")
            parsed.append(
                (
                    _spiffe_id(pair[0], f"pairs[{i}][0]", "authority"),
                    _spiffe_id(pair[1], f"pairs[{i}][1]", "authority"),
                )
            )
        revoked = fields.get("revoked")
        if not isinstance(revoked, list):
            raise _bad("authority", "revoked", "must be a list")
        return cls(
            policy_version=_int(fields, "policy_version", "authority"),
            revocation_version=_int(fields, "revocation_version", "authority"),
            bundle_sequence=_int(fields, "bundle_sequence", "authority"),
            pairs=tuple(parsed),
            revoked=tuple(
                _spiffe_id(r, f"revoked[{i}]", "authority") for i, r in enumerate(revoked)
            ),
            bundle=_text(fields, "bundle", "authority"),
            revoked_serials=_serials(fields.get("revoked_serials", [])),
            prefix_rules=_prefix_rules(fields.get("prefix_rules", [])),
            federated=_federated(fields.get("federated_bundles")),
            addresses=_addresses(fields.get("addresses", [])),
        )


def _prefix_rules(value: object) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, list):
        raise _bad("authority", "prefix_rules", "must be a list")
    rules: list[tuple[str, str]] = []
    for i, rule in enumerate(value):
        if not isinstance(rule, list) or len(rule) != 2:
            raise _bad("authority", f"prefix_rules[{i}]", "must be a [source, target] pair")
        ends = []
        for j, end in enumerate(rule):
            where = f"prefix_rules[{i}][{j}]"
            if not isinstance(end, str):
                raise _bad("authority", where, "must be a string")
            base = end.removesuffix("/*")
            ends.append(str(_spiffe_id(base, where, "authority")) + end[len(base) :])
        rules.append((ends[0], ends[1]))
    return tuple(rules)


def _serials(value: object) -> tuple[int, ...]:
    if not isinstance(value, list):
        raise _bad("authority", "revoked_serials", "must be a list")
    serials: list[int] = []
    for i, item in enumerate(value):
        if not isinstance(item, str) or not 0 < len(item) <= 64:
            raise _bad("authority", f"revoked_serials[{i}]", "must be a hexadecimal serial")
        try:
            serials.append(int(item, 16))
        except ValueError:
            raise _bad(
                "authority", f"revoked_serials[{i}]", "must be a hexadecimal serial"
            ) from None
    return tuple(serials)


def _addresses(value: object) -> tuple[tuple[str, int, SpiffeId], ...]:
    if not isinstance(value, list) or len(value) > MAX_ADDRESSES:
        raise _bad("authority", "addresses", f"must be a list of at most {MAX_ADDRESSES}")
    out: list[tuple[str, int, SpiffeId]] = []
    for i, item in enumerate(value):
        if (
            not isinstance(item, list)
            or len(item) != 3
            or not isinstance(item[0], str)
            or not isinstance(item[1], int)
            or isinstance(item[1], bool)
            or not 1 <= item[1] <= 65535
        ):
            raise _bad("authority", f"addresses[{i}]", "must be [ip, port, spiffe_id]")
        try:
            ip = str(ipaddress.ip_address(item[0]))
        except ValueError:
            raise _bad("authority", f"addresses[{i}][0]", "must be an IP address") from None
        out.append((ip, item[1], _spiffe_id(item[2], f"addresses[{i}][2]", "authority")))
    return tuple(out)
