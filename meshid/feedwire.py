"""The feed: what the authority tells one sidecar to enforce, as one typed message.

Part of the authority-sidecar wire (`meshid.wire`, whose docstring gives the
version rule): the pairs that concern the sidecar, every revocation, the trust
bundle, and the additive fields later versions brought (serials revoked one by
one, prefix rules, federated bundles, the address map for transparent
interception). Readers ignore what they do not know, so each addition kept
`WIRE_VERSION`.

Deltas. A sidecar that says ``delta=1`` in its watch query may get, instead
of its whole allow-list, the changes since the policy version it holds: a
feed whose ``pairs`` and ``prefix_rules`` are empty and whose ``delta``
object names the version it was cut from and the rules added and removed
since. Every other field is whole, as always. A sidecar that does not ask
(an older one) never gets a delta; a sidecar that gets a delta cut from a
version other than the one it holds refuses it (`DeltaMismatch`) and asks
for the whole list. The authority sends the whole list whenever it cannot
cut a delta (the sidecar is too far behind its bounded history).
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from typing import Any

from meshid.reasons import Reason
from meshid.spiffeid import SpiffeId
from meshid.wire import MAX_INT, WIRE_VERSION, WireError, _bad, _int, _object, _spiffe_id, _text

MAX_ADDRESSES = 100_000  # entries in the address map one feed carries


def _federated(value: object) -> str:
    """The feed's optional `federated_bundles` object, kept as JSON text."""
    if value is None:
        return "{}"  # an authority from before federation
    if not isinstance(value, dict):
        raise _bad("authority", "federated_bundles", "must be an object")
    return json.dumps(value, sort_keys=True)


class DeltaMismatch(WireError):
    """A delta cut from another policy version than the one held: the whole list is needed."""


Pairs = tuple[tuple[SpiffeId, SpiffeId], ...]
Rules = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class PolicyDelta:
    """The allow-list changes for one sidecar from `base_version` to the feed's version."""

    base_version: int
    pairs_added: Pairs = ()
    pairs_removed: Pairs = ()
    prefix_added: Rules = ()
    prefix_removed: Rules = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "base_version": self.base_version,
            "pairs_added": [[str(a), str(b)] for a, b in self.pairs_added],
            "pairs_removed": [[str(a), str(b)] for a, b in self.pairs_removed],
            "prefix_added": [[a, b] for a, b in self.prefix_added],
            "prefix_removed": [[a, b] for a, b in self.prefix_removed],
        }

    @classmethod
    def parse(cls, value: object) -> PolicyDelta:
        if not isinstance(value, dict):
            raise _bad("authority", "delta", "must be an object")
        base = value.get("base_version")
        if not isinstance(base, int) or isinstance(base, bool) or not 0 <= base <= MAX_INT:
            raise _bad("authority", "delta.base_version", "must be an integer of at least 0")
        return cls(
            base,
            _pairs(value.get("pairs_added", []), "delta.pairs_added"),
            _pairs(value.get("pairs_removed", []), "delta.pairs_removed"),
            _prefix_rules(value.get("prefix_added", []), "delta.prefix_added"),
            _prefix_rules(value.get("prefix_removed", []), "delta.prefix_removed"),
        )

    @property
    def size(self) -> int:
        """The number of rules it changes."""
        return (
            len(self.pairs_added)
            + len(self.pairs_removed)
            + len(self.prefix_added)
            + len(self.prefix_removed)
        )


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
    # Additive: set only in answer to a query that asked for deltas (see the module
    # docstring); `pairs` and `prefix_rules` are then empty and this says what changed.
    delta: PolicyDelta | None = None

    def applied_to(self, held: Feed) -> Feed:
        """This feed as a whole one: itself if it is whole, else `held` with the delta applied.

        Raises `DeltaMismatch` if the delta was cut from another version than `held`'s.
        """
        delta = self.delta
        if delta is None:
            return self
        if delta.base_version != held.policy_version:
            raise DeltaMismatch(
                f"a policy delta cut from policy version {delta.base_version}, "
                f"this sidecar holds {held.policy_version}",
                reason=Reason.POLICY_DELTA_MISMATCH,
            )
        pairs = set(held.pairs).difference(delta.pairs_removed).union(delta.pairs_added)
        rules = set(held.prefix_rules).difference(delta.prefix_removed).union(delta.prefix_added)
        return Feed(
            self.policy_version,
            self.revocation_version,
            self.bundle_sequence,
            tuple(sorted(pairs, key=lambda p: (str(p[0]), str(p[1])))),
            self.revoked,
            self.bundle,
            self.revoked_serials,
            tuple(sorted(rules)),
            self.federated,
            self.addresses,
        )

    def to_json(self) -> dict[str, Any]:
        doc = {
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
        if self.delta is not None:
            doc["delta"] = self.delta.to_json()
        return doc

    @classmethod
    def parse(cls, doc: object) -> Feed:
        fields = _object(doc, "authority", "feed")
        delta = fields.get("delta")
        revoked = fields.get("revoked")
        if not isinstance(revoked, list):
            raise _bad("authority", "revoked", "must be a list")
        return cls(
            policy_version=_int(fields, "policy_version", "authority"),
            revocation_version=_int(fields, "revocation_version", "authority"),
            bundle_sequence=_int(fields, "bundle_sequence", "authority"),
            pairs=_pairs(fields.get("pairs"), "pairs"),
            revoked=tuple(
                _spiffe_id(r, f"revoked[{i}]", "authority") for i, r in enumerate(revoked)
            ),
            bundle=_text(fields, "bundle", "authority"),
            revoked_serials=_serials(fields.get("revoked_serials", [])),
            prefix_rules=_prefix_rules(fields.get("prefix_rules", [])),
            federated=_federated(fields.get("federated_bundles")),
            addresses=_addresses(fields.get("addresses", [])),
            delta=None if delta is None else PolicyDelta.parse(delta),
        )


def _pairs(value: object, field: str) -> Pairs:
    if not isinstance(value, list):
        raise _bad("authority", field, "must be a list")
    parsed: list[tuple[SpiffeId, SpiffeId]] = []
    for i, pair in enumerate(value):
        if not isinstance(pair, list) or len(pair) != 2:
            raise _bad("authority", f"{field}[{i}]", "must be a [source, target] pair")
        parsed.append(
            (
                _spiffe_id(pair[0], f"{field}[{i}][0]", "authority"),
                _spiffe_id(pair[1], f"{field}[{i}][1]", "authority"),
            )
        )
    return tuple(parsed)


def _prefix_rules(value: object, field: str = "prefix_rules") -> Rules:
    if not isinstance(value, list):
        raise _bad("authority", field, "must be a list")
    rules: list[tuple[str, str]] = []
    for i, rule in enumerate(value):
        if not isinstance(rule, list) or len(rule) != 2:
            raise _bad("authority", f"{field}[{i}]", "must be a [source, target] pair")
        ends = []
        for j, end in enumerate(rule):
            where = f"{field}[{i}][{j}]"
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
