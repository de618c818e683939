"""What `meshid ca status` and `policy deny --dry-run` print, from the sidecars' reports.

Pure formatting over what the authority holds; warnings come first, because
an operator reads this when something is wrong.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from ca.authority import Authority
from ca.rootlife import ActiveRoot, PendingRoot, warning_text
from ca.services import build_map
from ca.values import REPORT_FRESH, SidecarReport, printable
from meshid.errors import StateError
from meshid.spiffeid import SpiffeId

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


def _who(entry: SidecarReport) -> str:
    return f"{printable(str(entry.spiffe_id))} [{printable(entry.instance)}]"


def connections_of_pair(
    reports: list[SidecarReport], src: SpiffeId, dst: SpiffeId, now: datetime
) -> tuple[list[str], int]:
    """Lines describing the live src -> dst connections, and how many there are in all.

    Both ends report the same connection (src's outbound, dst's inbound);
    the count is of src's side when it reports, else of dst's. Every field
    that came from a workload is shown through `printable`.
    """
    lines: list[str] = []
    by_side = {"outbound": 0, "inbound": 0}
    for entry in reports:
        if now - entry.seen > REPORT_FRESH:
            continue
        if entry.spiffe_id == src:
            direction, peer = "outbound", dst
        elif entry.spiffe_id == dst:
            direction, peer = "inbound", src
        else:
            continue
        for pair in entry.report.pairs:
            if pair.direction == direction and pair.peer_id == peer:
                by_side[direction] += pair.count
                arrow = "->" if direction == "outbound" else "<-"
                lines.append(
                    f"{_who(entry)} {direction} {arrow} {printable(str(peer))}: "
                    f"{pair.count} connection(s), reported {_ago(now - entry.seen)}"
                )
        for conn in entry.report.connections:
            if conn.direction == direction and conn.peer_id == peer:
                started = conn.started.isoformat() if conn.started else "?"
                lines.append(
                    f"    #{conn.id} peer {printable(conn.peer_addr)} since "
                    f"{printable(started)} bytes in/out {conn.bytes_in}/{conn.bytes_out}"
                )
        if entry.report.connections_omitted:
            lines.append(
                f"    ({entry.report.connections_omitted} more connection(s) of {_who(entry)} "
                "not listed one by one)"
            )
    total = by_side["outbound"] or by_side["inbound"]
    return lines, total


def _lifecycle(authority: Authority) -> tuple[ActiveRoot, PendingRoot | None] | None:
    """The active root's life; None while a joining instance's first root waits."""
    if authority.pending_root() is not None:
        try:
            return authority.root_lifecycle()
        except StateError:
            return None
    return authority.root_lifecycle()


def render_status(authority: Authority) -> list[str]:
    now = authority.clock_now()
    policy_version, revocation_version, sequence = authority.versions()
    reports, skipped = authority.reports()
    ttl = authority.svid_ttl
    warnings: list[str] = [*skipped]
    body: list[str] = [
        f"trust domain {authority.trust_domain.name}: bundle sequence {sequence}, "
        f"policy version {policy_version}, revocation version {revocation_version}",
    ]
    lifecycle = _lifecycle(authority)
    if lifecycle is None:
        first = authority.pending_root()
        assert first is not None  # _lifecycle returns None only then
        body.append(
            f"this instance signs nothing yet: its root {first.generation} activates "
            f"{_ago(now - first.activate_at)} once live sidecars hold it"
        )
    else:
        active, pending = lifecycle
        root_warning = warning_text(now, active, pending)  # thirty days, or 1/6 of a short life
        if root_warning is not None:
            warnings.append(root_warning)
        body.append(f"active root {active.generation} expires {_ago(now - active.not_after)}")
    rotation = authority.rotation_status()
    if rotation is not None:
        generation, lagging = rotation
        problem = authority.next_root_problem()
        if problem is not None:
            warnings.append(
                f"root {generation} cannot activate: {printable(problem)}; "
                "the current root keeps signing"
            )
        elif lagging:
            warnings.append(
                f"root {generation} waits to activate until these sidecars hold bundle "
                f"{sequence}: {', '.join(lagging)} (or rotate with --force)"
            )
        else:
            body.append(f"root {generation} is published and activates on schedule")
    for instance in authority.instances():
        signs = (
            f"signs with root {instance.generation}"
            if instance.generation is not None
            else f"waits for root {instance.pending} to join every sidecar's bundle"
        )
        heard = (
            f"last heard {_ago(now - instance.last_heard)}"
            if instance.last_heard is not None
            else "never heard from"
        )
        body.append(f"instance {printable(instance.name)}: {signs}, {heard}")
    for federated in authority.federations():
        line = (
            f"federated {federated.trust_domain}: bundle sequence {federated.bundle.sequence}"
            f" from {federated.url}"
        )
        if federated.stale(now):
            fetched = federated.fetched_at
            since = f"last fetched {_ago(now - fetched)}" if fetched else "never fetched"
            warnings.append(
                f"federated bundle of {federated.trust_domain} is stale ({since}; "
                f"{federated.failures} failed fetches, last: {federated.last_error}); "
                "the last good one is kept"
            )
        body.append(line)

    body.append("")
    body.append("running sidecars (reports from the last 30s):")
    running: set[SpiffeId] = set()
    for entry in reports:
        if now - entry.seen > REPORT_FRESH:
            continue
        running.add(entry.spiffe_id)
        report, who = entry.report, _who(entry)
        not_after = report.svid_not_after
        held = report.bundle_sequence
        body.append(
            f"  {who} seen {_ago(now - entry.seen)}, SVID {printable(str(report.svid_serial))} "
            f"expires {_ago(now - not_after) if not_after else '?'}, bundle {held}, "
            f"policy {report.policy_version}, live connections {report.live_connections}"
        )
        if not_after is not None:
            left = not_after - now
            if left <= timedelta(0):
                warnings.append(f"{who}: SVID expired {_ago(-left)}")
            elif left < ttl * WARN_SHARE:
                warnings.append(
                    f"{who}: SVID expires {_ago(-left)}, less than a quarter of "
                    "its lifetime left (is renewal failing?)"
                )
        if held < sequence:
            warnings.append(f"{who}: holds bundle {held}, current is {sequence}")
        for q in report.quarantined:
            warnings.append(f"{who}: peer_quarantined {printable(q.peer)} ({q.seconds_left}s left)")
        if report.quarantined_omitted:
            warnings.append(
                f"{who}: peer_quarantined {report.quarantined_omitted} more peer(s) not listed"
            )
    if not running:
        body.append("  (none)")
    _, conflicts = build_map(authority.services())
    for (host, port), ids in sorted(conflicts.items()):
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        warnings.append(
            f"address {where} is claimed by {', '.join(map(str, ids))}: a conflict, left out "
            "of the address map (fix with `meshid service remove` or the sidecars' advertise)"
        )

    body.append("")
    body.append("enrolled identities:")
    pods = authority.pod_uids()
    for sid, latest, issued, revoked in authority.workloads():
        state = "REVOKED" if revoked else ("running" if sid in running else "not reporting")
        enrolled_by = pods.get(str(sid))
        by = f", enrolled by pod {' '.join(map(printable, enrolled_by))}" if enrolled_by else ""
        body.append(
            f"  {sid}: {issued} SVID(s) issued, latest expires {_ago(now - latest)}, {state}{by}"
        )
    if warnings:
        return [*(f"WARNING {w}" for w in warnings), "", *body]
    return body


def status_document(authority: Authority) -> dict[str, object]:
    """`ca status --json`: the same facts as `render_status`, as one JSON-ready document.

    Keys: trust_domain, bundle_sequence, policy_version, revocation_version,
    active_root {generation, not_after} (null while a joining instance waits),
    warnings [text], sidecars [{id,
    instance, seen, svid_serial, svid_not_after, bundle_sequence,
    policy_version, live_connections}] (reports from the last 30s), instances
    [{name, root_generation, pending_root_generation, last_heard}] (PostgreSQL), and
    workloads [{id, svids_issued, latest_not_after, revoked, running}].
    Times are ISO 8601 UTC. Workload-supplied text is passed through as data
    (JSON escapes it), not through `printable`.
    """
    now = authority.clock_now()
    policy_version, revocation_version, sequence = authority.versions()
    reports, _skipped = authority.reports()
    lifecycle = _lifecycle(authority)
    sidecars: list[dict[str, object]] = []
    running: set[SpiffeId] = set()
    for entry in reports:
        if now - entry.seen > REPORT_FRESH:
            continue
        running.add(entry.spiffe_id)
        report = entry.report
        sidecars.append(
            {
                "id": str(entry.spiffe_id),
                "instance": entry.instance,
                "seen": entry.seen.isoformat(),
                "svid_serial": report.svid_serial,
                "svid_not_after": report.svid_not_after.isoformat()
                if report.svid_not_after
                else None,
                "bundle_sequence": report.bundle_sequence,
                "policy_version": report.policy_version,
                "live_connections": report.live_connections,
            }
        )
    warnings = [
        line[len("WARNING ") :] for line in render_status(authority) if line.startswith("WARNING ")
    ]
    return {
        "trust_domain": authority.trust_domain.name,
        "bundle_sequence": sequence,
        "policy_version": policy_version,
        "revocation_version": revocation_version,
        "active_root": None
        if lifecycle is None
        else {
            "generation": lifecycle[0].generation,
            "not_after": lifecycle[0].not_after.isoformat(),
        },
        "warnings": warnings,
        "instances": [
            {
                "name": instance.name,
                "root_generation": instance.generation,
                "pending_root_generation": instance.pending,
                "last_heard": instance.last_heard.isoformat() if instance.last_heard else None,
            }
            for instance in authority.instances()
        ],
        "sidecars": sidecars,
        "workloads": [
            {
                "id": str(sid),
                "svids_issued": issued,
                "latest_not_after": latest.isoformat(),
                "revoked": revoked,
                "running": sid in running,
            }
            for sid, latest, issued, revoked in authority.workloads()
        ],
    }
