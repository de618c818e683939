"""The allow-list's recent changes, from which the feed cuts deltas.

Every change to the allow-list also lands in `policy_changes`, a bounded
history (`HISTORY_ROWS` rules) from which the feed cuts a sidecar the changes
since the version it holds (`meshid.feedwire`). The counter
`policy_history_floor` is the oldest version from which the history is
complete: when old changes are trimmed, or one change is larger than the
whole history, the floor moves up and sidecars below it get whole lists.
Other policy-version bumps (the address map, federation) change no rule and
leave no row: a delta across them is empty, as it should be.
"""

from __future__ import annotations

from collections.abc import Iterable

from ca.db import Connection
from meshid.policy import is_prefix

HISTORY_ROWS = 10_000  # rule changes the authority remembers for deltas
FLOOR = "policy_history_floor"
Change = tuple[str, str, int]  # source, target, 1 if added (0: removed)


def remember(
    conn: Connection,
    version: int,
    added: list[tuple[str, str]],
    removed: list[tuple[str, str]],
) -> None:
    """Record one version's rule changes in the bounded history (see the module docstring)."""
    if len(added) + len(removed) > HISTORY_ROWS:
        conn.execute("DELETE FROM policy_changes")
        _set_floor(conn, version)
        return
    conn.executemany(
        "INSERT INTO policy_changes (version, source, target, added) VALUES (?, ?, ?, ?)",
        [(version, s, t, 1) for s, t in added] + [(version, s, t, 0) for s, t in removed],
    )
    excess = conn.execute("SELECT COUNT(*) FROM policy_changes").fetchone()[0] - HISTORY_ROWS
    if excess <= 0:
        return
    cut = version
    for old, count in conn.execute(
        "SELECT version, COUNT(*) FROM policy_changes GROUP BY version ORDER BY version"
    ).fetchall():
        cut, excess = old, excess - count
        if excess <= 0:
            break
    conn.execute("DELETE FROM policy_changes WHERE version <= ?", (cut,))
    _set_floor(conn, cut)


def _set_floor(conn: Connection, version: int) -> None:
    conn.execute(
        "INSERT INTO counters (name, value) VALUES (?, ?) "
        "ON CONFLICT(name) DO UPDATE SET value = excluded.value",
        (FLOOR, version),
    )


def changes_between(conn: Connection, since: int, upto: int) -> list[Change]:
    """The rule changes of the versions after `since` up to `upto`, oldest first."""
    rows = conn.execute(
        # one version's changes name distinct rules (a diff), so their order within it is moot
        "SELECT source, target, added FROM policy_changes WHERE version > ? AND version <= ? "
        "ORDER BY version",
        (since, upto),
    ).fetchall()
    return [(src, dst, added) for src, dst, added in rows]


def net_delta(changes: Iterable[Change], mine: set[str]) -> dict[str, list[list[str]]]:
    """The net of `changes` to the rules with an end in `mine`.

    The last change to a rule wins: added then removed is removed (which the
    sidecar, not holding it, ignores), removed then added is added.
    """
    last: dict[tuple[str, str], int] = {}
    for src, dst, added in changes:
        if src in mine or dst in mine:
            last[(src, dst)] = added
    out: dict[str, list[list[str]]] = {
        "pairs_added": [],
        "pairs_removed": [],
        "prefix_added": [],
        "prefix_removed": [],
    }
    for (src, dst), added in sorted(last.items()):
        kind = "prefix" if is_prefix(src) or is_prefix(dst) else "pairs"
        out[f"{kind}_{'added' if added else 'removed'}"].append([src, dst])
    return out
