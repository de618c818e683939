"""The feed as a delta: the allow-list changes since the sidecar's version, from a bounded history.

The authority keeps the rule changes of recent policy versions; a sidecar that
asks for deltas and holds a version the history still covers gets only the
changes that concern it, anything else gets its whole list. Whichever it gets,
applied to what it holds, it equals the whole list the authority would send.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from ca.authority import Authority
from ca.policyhistory import HISTORY_ROWS
from ca.store import DB_NAME
from meshid.feedwire import Feed
from meshid.spiffeid import SpiffeId
from meshid.wire import WIRE_VERSION

WEB = SpiffeId.parse("spiffe://example.org/web")
API = SpiffeId.parse("spiffe://example.org/api")
DB = SpiffeId.parse("spiffe://example.org/db")
CACHE = SpiffeId.parse("spiffe://example.org/ns/cache/sa/redis")


def _feed(authority: Authority, who: SpiffeId, since: int | None = None) -> Feed:
    return Feed.parse(authority.feed(who, since=since))


def test_a_sidecar_one_version_behind_gets_only_that_change(authority: Authority) -> None:
    for i in range(50):
        authority.allow(WEB, SpiffeId.parse(f"spiffe://example.org/svc{i}"))
    held = _feed(authority, WEB)
    authority.allow(WEB, API)
    whole = _feed(authority, WEB)
    delta = _feed(authority, WEB, since=held.policy_version)
    assert delta.delta is not None and delta.delta.base_version == held.policy_version
    assert delta.pairs == () and delta.delta.pairs_added == ((WEB, API),)
    assert delta.delta.size == 1
    assert delta.applied_to(held) == whole
    small = len(json.dumps(delta.to_json()))
    assert small < len(json.dumps(whole.to_json())) - 50 * len(str(WEB))


def test_a_delta_names_only_the_changes_that_concern_the_sidecar(authority: Authority) -> None:
    authority.allow(WEB, API)
    held_api, held_db = _feed(authority, API), _feed(authority, DB)
    authority.allow(API, DB)  # concerns both
    authority.deny(WEB, API)  # concerns API only
    authority.allow("spiffe://example.org/ns/cache/*", DB)  # a prefix rule: DB and cache
    authority.apply_policy(
        [("spiffe://example.org/ns/cache/*", str(DB)), (str(API), str(DB)), (str(WEB), str(CACHE))]
    )
    for who, held in ((API, held_api), (DB, held_db)):
        delta = _feed(authority, who, since=held.policy_version)
        assert delta.delta is not None
        assert delta.applied_to(held) == _feed(authority, who)
    api_delta = _feed(authority, API, since=held_api.policy_version).delta
    assert api_delta is not None
    assert set(api_delta.pairs_added) == {(API, DB)}
    assert set(api_delta.pairs_removed) == {(WEB, API)}
    assert api_delta.prefix_added == ()
    db_delta = _feed(authority, DB, since=held_db.policy_version).delta
    assert db_delta is not None and db_delta.pairs_removed == ()
    assert db_delta.prefix_added == (("spiffe://example.org/ns/cache/*", str(DB)),)


def test_a_sidecar_past_the_history_gets_the_whole_list(authority: Authority) -> None:
    authority.allow(WEB, API)
    held = _feed(authority, WEB)
    # One change larger than the whole history: the history is gone at once.
    authority.apply_policy(
        [(str(WEB), f"spiffe://example.org/svc{i}") for i in range(HISTORY_ROWS + 1)]
    )
    whole = _feed(authority, WEB, since=held.policy_version)
    assert whole.delta is None and len(whole.pairs) == HISTORY_ROWS + 1
    assert whole == _feed(authority, WEB)
    # From the new version on, deltas again.
    authority.allow(API, WEB)
    delta = _feed(authority, WEB, since=whole.policy_version)
    assert delta.delta is not None and delta.delta.pairs_added == ((API, WEB),)
    assert delta.applied_to(whole) == _feed(authority, WEB)


def test_the_history_is_bounded_and_trims_the_oldest_versions(
    authority: Authority, state: Path
) -> None:
    held = _feed(authority, WEB)
    half = HISTORY_ROWS // 2 + 1
    authority.apply_policy([(str(WEB), f"spiffe://example.org/a{i}") for i in range(half)])
    middle = _feed(authority, WEB)
    authority.apply_policy([(str(WEB), f"spiffe://example.org/b{i}") for i in range(half)])
    rows = sqlite3.connect(state / DB_NAME).execute("SELECT COUNT(*) FROM policy_changes")
    assert rows.fetchone()[0] <= HISTORY_ROWS
    assert _feed(authority, WEB, since=held.policy_version).delta is None
    assert _feed(authority, WEB, since=middle.policy_version).applied_to(middle) == _feed(
        authority, WEB
    )


def test_a_version_the_authority_never_had_gets_the_whole_list(authority: Authority) -> None:
    authority.allow(WEB, API)
    current = _feed(authority, WEB).policy_version
    for since in (current + 5, -1):
        assert _feed(authority, WEB, since=since).delta is None
    # Up to date: an empty delta, not the whole list again.
    same = _feed(authority, WEB, since=current)
    assert same.delta is not None and same.delta.size == 0 and same.pairs == ()


def test_the_feed_the_authority_answers_with_is_a_feed_as_the_wire_writes_it(
    authority: Authority,
) -> None:
    # The watch answers with the rows as they are, without a Feed in between: they must
    # already be what Feed.parse reads and to_json writes, field by field.
    authority.allow(WEB, API)
    authority.allow("spiffe://example.org/ns/*", WEB)
    authority.revoke(DB)
    for since in (None, 0):
        doc = {"v": WIRE_VERSION, **authority.feed(WEB, since=since)}
        assert Feed.parse(json.loads(json.dumps(doc))).to_json() == doc
