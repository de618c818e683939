"""The feed of every sidecar at one version, read once: what is shared, and each one's pairs.

A change wakes every watching sidecar and each asks for its feed. Read for
each one, the allow-list (and the prefix rules, the revocations, the address
map) made the work of one change grow with the square of the mesh: ten
thousand sidecars, ten thousand scans of ten thousand rows. `FeedIndex`
holds one version's rows, indexed by the identity they name, so each
sidecar's feed is a few dictionary lookups. Pure: `ca.access` reads the
rows and builds a new index when one of the versions moves, which every
change to what a feed carries does (that is also what wakes the watchers).

The shared part (the bundle, the revocations, the addresses, the federated
bundles) is also encoded once, when the index is built: a reply is spliced
from those bytes and the sidecar's own few fields (`FeedIndex.encode`), where
encoding the whole document for every sidecar took its share of each change.
The bytes are those `json.dumps` writes for the merged document.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from meshid.policy import is_prefix, rule_ends
from meshid.spiffeid import SpiffeId

Versions = tuple[int, int, int]  # policy, revocation, bundle sequence
CACHED_BASES = 8  # versions held by sidecars whose changes since an index keeps (`changes`)


@dataclass(frozen=True, slots=True)
class FeedIndex:
    versions: Versions
    shared: dict[str, Any]  # the fields every sidecar gets alike
    pairs: dict[str, list[list[str]]]  # ID -> exact pairs naming it on either side, in order
    prefix_rules: dict[str, list[tuple[str, str]]]  # rule end -> the prefix rules naming it
    shared_json: bytes  # `shared`'s members, encoded (see `encode_members`)
    # policy version a sidecar holds -> the rule changes since (source, target, added),
    # None if the history does not reach back to it: read once for the sidecars holding
    # it (a change wakes them all). Filled by `ca.access`, at most CACHED_BASES of them.
    changes: dict[int, list[tuple[str, str, int]] | None]

    @classmethod
    def build(
        cls, versions: Versions, rules: Iterable[tuple[str, str]], shared: dict[str, Any]
    ) -> FeedIndex:
        """Index the allow-list (`rules`, every row) for `versions`."""
        pairs: dict[str, list[list[str]]] = {}
        prefixed: dict[str, list[tuple[str, str]]] = {}
        for src, dst in sorted(rules):
            if is_prefix(src) or is_prefix(dst):
                for end in {src, dst}:
                    prefixed.setdefault(end, []).append((src, dst))
                continue
            for end in {src, dst}:
                pairs.setdefault(end, []).append([src, dst])
        return cls(versions, shared, pairs, prefixed, encode_members(shared), {})

    def feed(self, spiffe_id: SpiffeId) -> dict[str, object]:
        """What `spiffe_id`'s sidecar enforces: its pairs, the prefix rules that can match
        it, and what everyone gets, in the order a query would have given them."""
        return {**self.shared, **self.own(spiffe_id)}

    def own(self, spiffe_id: SpiffeId) -> dict[str, object]:
        """The part of `spiffe_id`'s feed that is its own: its pairs and prefix rules."""
        matched = {rule for end in rule_ends(spiffe_id) for rule in self.prefix_rules.get(end, ())}
        return {
            "pairs": [list(pair) for pair in self.pairs.get(str(spiffe_id), ())],
            "prefix_rules": [[src, dst] for src, dst in sorted(matched)],
        }

    def encode(self, head: bytes, own: dict[str, object]) -> bytes:
        """The feed as compact `json.dumps` writes ``{**head, **self.shared, **own}``:
        `head`'s members come encoded (`encode_members`), the shared part from the bytes
        made once, `own` is encoded here. The three name different fields (a field named
        twice would be written twice, where a dict keeps the last)."""
        parts = (head, self.shared_json, encode_members(own))
        return b"{" + b",".join(part for part in parts if part) + b"}"


def encode_members(doc: dict[str, Any]) -> bytes:
    """`doc`'s members as compact `json.dumps` writes them, without the braces around
    them: b"" for an empty dict, so that pieces join with commas into one object."""
    return json.dumps(doc, separators=(",", ":")).encode()[1:-1]
