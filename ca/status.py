"""What `meshid ca status` and `policy deny --dry-run` print, from the sidecars' reports.

Pure formatting over what the authority holds; warnings come first, because
an operator reads this when something is wrong.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from ca.authority import REPORT_FRESH, Authority
from ca.rootlife import warning_text
from meshid.spiffeid import SpiffeId

Report = tuple[str, SpiffeId, datetime, dict[str, Any]]
WARN_SHARE = 0.25  # warn when less than this share of the SVID lifetime is left


def _ago(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    if seconds < 0:
        return f"in {_span(-seconds)}"
    return f"{_span(seconds)} ago"


def _span(seconds: int) -> str:
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 172800:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"


def _parse_time(text: Any) -> datetime | None:
    try:
        return datetime.fromisoformat(str(text))
    except ValueError:
        return None


def connections_of_pair(
    reports: list[Report], src: SpiffeId, dst: SpiffeId, now: datetime
) -> tuple[list[str], int]:
    """Lines describing the live src -> dst connections, and how many there are in all.

    Both ends report the same connection (src's outbound, dst's inbound);
    the count is of src's side when it reports, else of dst's.
    """
    lines: list[str] = []
    by_side = {"outbound": 0, "inbound": 0}
    for instance, sid, seen, report in reports:
        if now - seen > REPORT_FRESH:
            continue
        if sid == src:
            direction, peer = "outbound", dst
        elif sid == dst:
            direction, peer = "inbound", src
        else:
            continue
        for pair in report.get("pairs", []):
            if pair.get("direction") == direction and pair.get("peer_id") == str(peer):
                count = int(pair.get("count", 0))
                by_side[direction] += count
                arrow = "->" if direction == "outbound" else "<-"
                lines.append(
                    f"{sid} [{instance}] {direction} {arrow} {peer}: {count} connection(s), "
                    f"reported {_ago(now - seen)}"
                )
        for conn in report.get("connections", []):
            if conn.get("direction") == direction and conn.get("peer_id") == str(peer):
                lines.append(
                    f"    #{conn.get('id')} peer {conn.get('peer_addr')} since "
                    f"{conn.get('started')} bytes in/out {conn.get('bytes_in')}/"
                    f"{conn.get('bytes_out')}"
                )
    total = by_side["outbound"] or by_side["inbound"]
    return lines, total


def render_status(authority: Authority) -> list[str]:
    now = authority.clock_now()
    policy_version, revocation_version, sequence = authority.versions()
    reports = authority.reports()
    ttl = authority.svid_ttl
    warnings: list[str] = []
    body: list[str] = [
        f"trust domain {authority.trust_domain.name}: bundle sequence {sequence}, "
        f"policy version {policy_version}, revocation version {revocation_version}",
    ]
    active, pending = authority.root_lifecycle()
    root_warning = warning_text(now, active, pending)  # thirty days, or 1/6 of a short life
    if root_warning is not None:
        warnings.append(root_warning)
    body.append(f"active root {active.generation} expires {_ago(now - active.not_after)}")
    rotation = authority.rotation_status()
    if rotation is not None:
        generation, lagging = rotation
        if lagging:
            warnings.append(
                f"root {generation} waits to activate until these sidecars hold bundle "
                f"{sequence}: {', '.join(lagging)} (or rotate with --force)"
            )
        else:
            body.append(f"root {generation} is published and activates on schedule")

    body.append("")
    body.append("running sidecars (reports from the last 30s):")
    running: set[SpiffeId] = set()
    for instance, sid, seen, report in reports:
        if now - seen > REPORT_FRESH:
            continue
        running.add(sid)
        not_after = _parse_time(report.get("svid_not_after"))
        held = int(report.get("bundle_sequence", 0))
        body.append(
            f"  {sid} [{instance}] seen {_ago(now - seen)}, SVID {report.get('svid_serial')} "
            f"expires {_ago(now - not_after) if not_after else '?'}, bundle {held}, "
            f"policy {report.get('policy_version')}, live connections "
            f"{report.get('live_connections', 0)}"
        )
        if not_after is not None:
            left = not_after - now
            if left <= timedelta(0):
                warnings.append(f"{sid} [{instance}]: SVID expired {_ago(-left)}")
            elif left < ttl * WARN_SHARE:
                warnings.append(
                    f"{sid} [{instance}]: SVID expires {_ago(-left)}, less than a quarter of "
                    "its lifetime left (is renewal failing?)"
                )
        if held < sequence:
            warnings.append(f"{sid} [{instance}]: holds bundle {held}, current is {sequence}")
        for q in report.get("quarantined", []):
            warnings.append(
                f"{sid} [{instance}]: peer_quarantined {q.get('peer')} "
                f"({q.get('seconds_left')}s left)"
            )
    if not running:
        body.append("  (none)")

    body.append("")
    body.append("enrolled identities:")
    for sid, latest, issued, revoked in authority.workloads():
        state = "REVOKED" if revoked else ("running" if sid in running else "not reporting")
        body.append(
            f"  {sid}: {issued} SVID(s) issued, latest expires {_ago(now - latest)}, {state}"
        )
    if warnings:
        return [*(f"WARNING {w}" for w in warnings), "", *body]
    return body
